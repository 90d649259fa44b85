"""DeepSeek EPLB, re-implemented in NumPy, plus a converter to our `Placement`.

Source: deepseek-ai/EPLB ``eplb.py`` (main @ d52c72d, 2025-03-24; MIT licence) and its README. This is a
faithful port of ``balanced_packing``, ``replicate_experts``, ``rebalance_experts_hierarchical`` and
``rebalance_experts``: same steps, same float32 arithmetic, same outputs. The upstream code uses torch's
(unstable) descending sort; here ties are broken deterministically by the lowest index (a stable sort), and
``argmax`` picks the first maximum, which is what the upstream code does on the README example and what the
brief of this module asks for.

It is the baseline the scheduler's own policy (``policy.py``) is measured against: EPLB balances well but
ignores the previous placement, so re-running it reshuffles most slots (EPLB issue #25), and it can put
two replicas of one expert on one GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moe_runtime.placement import Placement

__all__ = [
    "balanced_packing",
    "eplb_gpu_order",
    "eplb_placement",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "replicate_experts",
]


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack n weighted items into `num_packs` packs of exactly n / num_packs items each.

    weight: [X, n]. Per row: items in descending weight order (ties: lowest index first) each go to the pack
    with the smallest running weight among the packs not yet full (ties: lowest pack index).
    Returns (pack_index[X, n], rank_in_pack[X, n]).
    """
    weight = np.asarray(weight, dtype=np.float32)
    num_layers, num_items = weight.shape
    if num_items % num_packs:
        raise ValueError(f"balanced_packing: {num_items} items do not split evenly into {num_packs} packs")
    per_pack = num_items // num_packs
    if per_pack == 1:
        pack_index = np.broadcast_to(np.arange(num_items, dtype=np.int64), weight.shape).copy()
        return pack_index, np.zeros(weight.shape, dtype=np.int64)

    order = np.argsort(-weight, axis=-1, kind="stable")
    pack_index = np.full(weight.shape, -1, dtype=np.int64)
    rank_in_pack = np.full(weight.shape, -1, dtype=np.int64)
    for i in range(num_layers):
        pack_weights = np.zeros(num_packs, dtype=np.float32)
        pack_items = np.zeros(num_packs, dtype=np.int64)
        for item in order[i]:
            open_packs = np.flatnonzero(pack_items < per_pack)
            pack = int(open_packs[np.argmin(pack_weights[open_packs])])
            pack_index[i, item] = pack
            rank_in_pack[i, item] = pack_items[pack]
            pack_weights[pack] += weight[i, item]
            pack_items[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replicate `num_log` logical experts into `num_phy` physical ones, minimising the max load per replica.

    weight: [X, num_log]. Starts with one replica each; each of the num_phy - num_log extra replicas goes to
    the expert with the largest weight / count (first on ties).
    Returns (phy2log[X, num_phy], rank[X, num_phy] (replica rank of each physical expert),
    logcnt[X, num_log]).
    """
    weight = np.asarray(weight, dtype=np.float32)
    n, num_log = weight.shape
    if num_phy < num_log:
        raise ValueError(f"replicate_experts: {num_phy} physical slots < {num_log} logical experts")
    phy2log = np.tile(np.arange(num_phy, dtype=np.int64), (n, 1))
    rank = np.zeros((n, num_phy), dtype=np.int64)
    logcnt = np.ones((n, num_log), dtype=np.int64)
    rows = np.arange(n)
    for i in range(num_log, num_phy):
        redundant = np.argmax(weight / logcnt.astype(np.float32), axis=-1)
        phy2log[:, i] = redundant
        rank[:, i] = logcnt[rows, redundant]
        logcnt[rows, redundant] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_experts_hierarchical(
    weight: np.ndarray, num_physical_experts: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's hierarchical policy. Returns (phy2log[L, R], phyrank[L, R], logcnt[L, E]).

    (1) pack expert groups (E / G contiguous experts) onto nodes with balanced_packing; (2) inside each node,
    replicate its E / N experts into R / N slots; (3) pack those replicas (load = w / count) onto the node's
    P / N GPUs, R / P slots each; (4) map back to global expert ids.
    """
    weight = np.asarray(weight, dtype=np.float32)
    num_layers, num_logical = weight.shape
    if num_logical % num_groups:
        raise ValueError(f"EPLB: {num_logical} experts not divisible into {num_groups} groups")
    if num_groups % num_nodes:
        raise ValueError(f"EPLB: {num_groups} groups not divisible over {num_nodes} nodes")
    if num_gpus % num_nodes:
        raise ValueError(f"EPLB: {num_gpus} GPUs not divisible over {num_nodes} nodes")
    if num_physical_experts % num_gpus:
        raise ValueError(f"EPLB: {num_physical_experts} replicas not divisible over {num_gpus} GPUs")
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_physical_experts // num_gpus
    log_per_node = num_logical // num_nodes

    # Step 1: pack groups to nodes; relabel experts node-major ("mlog").
    tokens_per_group = weight.reshape(num_layers, num_groups, group_size).sum(-1, dtype=np.float32)
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size)[:, :, None] + np.arange(group_size)
    ).reshape(num_layers, num_logical)
    mlog2log = _inverse(log2mlog)

    # Step 2: redundant experts within nodes. [L * N, E / N]
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, axis=-1).reshape(-1, log_per_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical_experts // num_nodes)

    # Step 3: pack physical experts to GPUs. [L * N, R / N]
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt.astype(np.float32), phy2mlog, axis=-1)
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    phy2pphy = pack_index * phy_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)

    # Step 4: back to global ids.
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=-1)
    pphy2mlog = (
        pphy2mlog.reshape(num_layers, num_nodes, -1) + np.arange(0, num_logical, log_per_node)[None, :, None]
    ).reshape(num_layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=-1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=-1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, axis=-1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB entry point. weight: [L, E] predicted load per logical expert.

    Hierarchical policy when num_groups % num_nodes == 0, otherwise the "global" policy, which is the same
    routine with one group and one node. Returns (phy2log[L, R], log2phy[L, E, maxcnt] (-1 padded; physical
    slot of each replica rank), logcnt[L, E]). Physical slot p lives on GPU p // (R / num_gpus).
    """
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise ValueError(f"EPLB: weight must be [layers, experts], got shape {weight.shape}")
    num_layers, num_logical = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, num_groups, num_nodes, num_gpus
        )
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    maxlogcnt = int(logcnt.max())
    log2phy = np.full((num_layers, num_logical * maxlogcnt), -1, dtype=np.int64)
    np.put_along_axis(
        log2phy,
        phy2log * maxlogcnt + phyrank,
        np.broadcast_to(np.arange(num_replicas, dtype=np.int64), (num_layers, num_replicas)),
        axis=-1,
    )
    return phy2log, log2phy.reshape(num_layers, num_logical, maxlogcnt), logcnt


# ----------------------------------------------------------------------------------------------- to Placement


def eplb_gpu_order(num_actors: int, actor_nodes: Sequence[int]) -> tuple[list[int], int]:
    """EPLB GPU index -> actor id, and the node count to give EPLB.

    EPLB numbers GPUs node-major (GPU g is on node g // (P / N)), so actors are sorted by (node, id). When
    the nodes do not hold the same number of actors EPLB's hierarchy does not apply and N = 1 is returned.
    """
    nodes = list(actor_nodes) if actor_nodes else [0] * num_actors
    if len(nodes) != num_actors:
        raise ValueError(f"actor_nodes has {len(nodes)} entries: expected {num_actors}")
    order = sorted(range(num_actors), key=lambda a: (nodes[a], a))
    distinct = sorted(set(nodes))
    sizes = {n: nodes.count(n) for n in distinct}
    num_nodes = len(distinct) if len(set(sizes.values())) == 1 else 1
    return order, num_nodes


def eplb_placement(
    load: np.ndarray,
    num_actors: int,
    slots_per_actor: int,
    actor_nodes: Sequence[int] = (),
    num_groups: int | None = None,
    version: int = 0,
) -> Placement:
    """Run EPLB with one GPU per actor and `slots_per_actor` physical slots each; return it as a Placement.

    `num_groups=None` means 1 group, which is what vLLM passes for models without expert groups (Yuan 2.0-M32
    has none); with more than one node that selects EPLB's global policy. GPU g maps to the g-th actor in
    (node, id) order, so EPLB's node-major GPU numbering matches the real nodes.

    EPLB may put two replicas of one expert on one GPU (no anti-affinity). A Placement forbids duplicate
    actors, so such replicas are merged into one replica on that actor; the expert has one replica fewer and
    the slot stays unused. With the dispatcher's even split, per-actor loads then equal EPLB's own
    accounting when the expert had 2 replicas (both on one GPU: that GPU serves it all either way) but not
    in general (3 replicas, 2 merged: w/2 + w/2 instead of 2w/3 + w/3).
    """
    load = np.asarray(load, dtype=np.float64)
    if load.ndim != 2:
        raise ValueError(f"load must be [layers, experts], got shape {load.shape}")
    num_layers, num_experts = load.shape
    num_replicas = num_actors * slots_per_actor
    if num_replicas < num_experts:
        raise ValueError(
            f"{num_actors} actors x {slots_per_actor} slots = {num_replicas} < {num_experts} experts"
        )
    order, num_nodes = eplb_gpu_order(num_actors, actor_nodes)
    groups = 1 if num_groups is None else num_groups
    phy2log, _, _ = rebalance_experts(load, num_replicas, groups, num_nodes, num_actors)
    replicas: list[tuple[tuple[int, ...], ...]] = []
    for layer in range(num_layers):
        holders: list[list[int]] = [[] for _ in range(num_experts)]
        for slot, expert in enumerate(phy2log[layer]):
            actor = order[slot // slots_per_actor]
            if actor not in holders[expert]:
                holders[expert].append(actor)
        replicas.append(tuple(tuple(sorted(h)) for h in holders))
    return Placement(num_actors, tuple(replicas), version, tuple(actor_nodes))
