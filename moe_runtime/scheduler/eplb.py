"""DeepSeek EPLB, ported op for op in torch, plus a converter to our `Placement`.

Source: https://github.com/deepseek-ai/EPLB/blob/57919718be1fbe2baca80a42a7df4de7119aaa95/eplb.py
lines 1-162 (``balanced_packing``, ``replicate_experts``, ``rebalance_experts_hierarchical``,
``rebalance_experts``: the lines of main @ d52c72d, 2025-03-24, with the global policy of e1100fe). The port
calls the same torch ops in the same order, so its outputs are upstream's to the element: torch's default
(unstable) descending sort in ``balanced_packing`` (pinned torch, CPU: index order on rows of up to 16 items, not
beyond, so ties on longer rows land where upstream puts them), ``max(dim=-1).indices`` (first maximum) in
``replicate_experts``, float32 running sums, and the hierarchical / global choice. Upstream's asserts became
ValueErrors that say what is wrong, and ``rebalance_experts`` checks that weight is 2-D.

It is the baseline the scheduler's own policy (``policy.py``) is measured against: EPLB balances well but
ignores the previous placement, so re-running it reshuffles most slots (EPLB issue #25), and it can put
two replicas of one expert on one GPU.
"""

# The four EPLB functions below are ported from deepseek-ai/EPLB, under this licence:
#
# MIT License
#
# Copyright (c) 2025 DeepSeek
#
# Permission is hereby granted, free of charge, to any person obtaining a copy
# of this software and associated documentation files (the "Software"), to deal
# in the Software without restriction, including without limitation the rights
# to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
# copies of the Software, and to permit persons to whom the Software is
# furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in all
# copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
# SOFTWARE.

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moe_runtime.placement import Placement

__all__ = [
    "balanced_packing",
    "eplb_gpu_order",
    "eplb_placement",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "replicate_experts",
]


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack n weighted items into `num_packs` packs of exactly n / num_packs items each.

    weight: [X, n]. Per row: items in the order of torch's default descending sort each go to the pack with
    the smallest running weight among the packs not yet full (ties: lowest pack index).
    Returns (pack_index[X, n], rank_in_pack[X, n]).
    """
    num_layers, num_items = weight.shape
    if num_items % num_packs:
        raise ValueError(f"balanced_packing: {num_items} items do not split evenly into {num_packs} packs")
    items_per_pack = num_items // num_packs
    if items_per_pack == 1:
        pack_index = torch.arange(num_items, dtype=torch.int64, device=weight.device).expand(weight.shape)
        rank_in_pack = torch.zeros_like(weight, dtype=torch.int64)
        return pack_index, rank_in_pack

    # Not stable=True: upstream's unstable sort decides the order of ties, and so where they land.
    order = weight.float().sort(-1, descending=True).indices.cpu()
    pack_index = torch.full_like(weight, fill_value=-1, dtype=torch.int64, device="cpu")
    rank_in_pack = torch.full_like(pack_index, fill_value=-1)
    for i in range(num_layers):
        pack_weights = [0] * num_packs  # int 0, then 0-d tensors: float32 sums, as upstream
        pack_items = [0] * num_packs
        for item in order[i]:
            open_packs = (p for p in range(num_packs) if pack_items[p] < items_per_pack)
            pack = min(open_packs, key=pack_weights.__getitem__)
            pack_index[i, item] = pack
            rank_in_pack[i, item] = pack_items[pack]
            pack_weights[pack] += weight[i, item]
            pack_items[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replicate `num_log` logical experts into `num_phy` physical ones, minimising the max load per replica.

    weight: [X, num_log]. Starts with one replica each; each of the num_phy - num_log extra replicas goes to
    the expert with the largest weight / count (first on ties).
    Returns (phy2log[X, num_phy], rank[X, num_phy] (replica rank of each physical expert),
    logcnt[X, num_log]).
    """
    n, num_log = weight.shape
    if num_phy < num_log:
        raise ValueError(f"replicate_experts: {num_phy} physical slots < {num_log} logical experts")
    device = weight.device
    phy2log = torch.arange(num_phy, dtype=torch.int64, device=device).repeat(n, 1)
    rank = torch.zeros(n, num_phy, dtype=torch.int64, device=device)
    logcnt = torch.ones(n, num_log, dtype=torch.int64, device=device)
    rows = torch.arange(n, dtype=torch.int64, device=device)
    for i in range(num_log, num_phy):
        redundant = (weight / logcnt).max(dim=-1).indices
        phy2log[:, i] = redundant
        rank[:, i] = logcnt[rows, redundant]
        logcnt[rows, redundant] += 1
    return phy2log, rank, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    positions = torch.arange(perm.size(1), dtype=torch.int64, device=perm.device).expand(perm.shape)
    inv.scatter_(1, perm, positions)
    return inv


def rebalance_experts_hierarchical(
    weight: torch.Tensor, num_physical_experts: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EPLB's hierarchical policy. Returns (phy2log[L, R], phyrank[L, R], logcnt[L, E]).

    (1) pack expert groups (E / G contiguous experts) onto nodes with balanced_packing; (2) inside each node,
    replicate its E / N experts into R / N slots; (3) pack those replicas (load = w / count) onto the node's
    P / N GPUs, R / P slots each; (4) map back to global expert ids.
    """
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

    # Step 1: pack groups to nodes; relabel experts node-major ("mlog").
    tokens_per_group = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size).unsqueeze(-1)
        + torch.arange(group_size, dtype=torch.int64, device=group_pack.device)
    ).flatten(-2)
    mlog2log = _inverse(log2mlog)

    # Step 2: redundant experts within nodes. [L * N, E / N]
    tokens_per_mlog = weight.gather(-1, mlog2log).view(-1, num_logical // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical_experts // num_nodes)

    # Step 3: pack physical experts to GPUs. [L * N, R / N]
    tokens_per_phy = (tokens_per_mlog / mlogcnt).gather(-1, phy2mlog)
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    phy2pphy = pack_index * phy_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)

    # Step 4: back to global ids.
    pphy2mlog = phy2mlog.gather(-1, pphy2phy)  # [L * N, R / N]
    pphy2mlog = (
        pphy2mlog.view(num_layers, num_nodes, -1)
        + torch.arange(0, num_logical, num_logical // num_nodes, device=group_pack.device).view(1, -1, 1)
    ).flatten(-2)
    pphy2log = mlog2log.gather(-1, pphy2mlog)
    pphyrank = phyrank.gather(-1, pphy2phy).view(num_layers, -1)
    logcnt = mlogcnt.view(num_layers, -1).gather(-1, log2mlog)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EPLB entry point. weight: [L, E] predicted load per logical expert (any dtype, any device).

    Hierarchical policy when num_groups % num_nodes == 0, otherwise the "global" policy, which is the same
    routine with one group and one node. Returns int64 CPU tensors (phy2log[L, R], log2phy[L, E, maxcnt]
    (-1 padded; physical slot of each replica rank), logcnt[L, E]). Physical slot p lives on GPU
    p // (R / num_gpus).
    """
    if weight.ndim != 2:
        raise ValueError(f"EPLB: weight must be [layers, experts], got shape {tuple(weight.shape)}")
    num_layers, num_logical = weight.shape
    weight = weight.float().cpu()
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, num_groups, num_nodes, num_gpus
        )
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    maxlogcnt = int(logcnt.max().item())
    log2phy = torch.full((num_layers, num_logical, maxlogcnt), -1, dtype=torch.int64, device=logcnt.device)
    log2phy.view(num_layers, -1).scatter_(
        -1,
        phy2log * maxlogcnt + phyrank,
        torch.arange(num_replicas, dtype=torch.int64, device=log2phy.device).expand(num_layers, -1),
    )
    return phy2log, log2phy, logcnt


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
    phy2log_t, _, _ = rebalance_experts(torch.tensor(load), num_replicas, groups, num_nodes, num_actors)
    phy2log: list[list[int]] = phy2log_t.tolist()
    replicas: list[tuple[tuple[int, ...], ...]] = []
    for layer in range(num_layers):
        holders: list[list[int]] = [[] for _ in range(num_experts)]
        for slot, expert in enumerate(phy2log[layer]):
            actor = order[slot // slots_per_actor]
            if actor not in holders[expert]:
                holders[expert].append(actor)
        replicas.append(tuple(tuple(sorted(h)) for h in holders))
    return Placement(num_actors, tuple(replicas), version, tuple(actor_nodes))
