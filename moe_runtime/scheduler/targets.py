"""Whole-layer target plans, ignoring the byte budget: a menu of (max load, copies) options per layer.

Replica counts come from EPLB's greedy; assignments pack replicas largest-first (LPT), node first or flat,
keeping a replica where the expert already is while that stays under a load bound (five bounds are tried);
DeepSeek EPLB's own plan, relabelled onto our actors, is one more option. Every option is pruned of needless
copies; the most balanced and the cheapest LPT plan and EPLB's are also polished by local search."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moe_runtime.scheduler.layer import LayerState, SlotLimits
from moe_runtime.scheduler.search import polish, prune

__all__ = ["LayerOption", "layer_targets", "lpt_target", "replica_counts"]

# Load bounds for keeping a replica in place, as slack over the layer's lower bound (None = never keep).
KEEP_SLACKS = (None, 0.0, 0.05, 0.15, math.inf)


@dataclass
class LayerOption:
    """One whole-layer plan: hosts per expert, its max actor load, its copies, its slots used per actor."""

    hosts: tuple[tuple[int, ...], ...]
    max: float
    copies: int
    used: list[int]

    @classmethod
    def of(cls, layer: LayerState) -> LayerOption:
        return cls(layer.rows(), layer.max, layer.copies, [layer.used(a) for a in range(layer.num_actors)])


def replica_counts(w: np.ndarray, total: int, max_rep: int) -> list[int]:
    """EPLB's replicate_experts greedy for one layer, capped per expert; stops when no load is left."""
    counts = np.ones(len(w), dtype=np.int64)
    for _ in range(max(0, total - len(w))):
        ratio = w / counts
        ratio[counts >= max_rep] = -1.0
        e = int(np.argmax(ratio))
        if ratio[e] <= 0:
            break
        counts[e] += 1
    return counts.tolist()


def lpt_target(
    w: np.ndarray,
    counts: list[int],
    orig: Sequence[frozenset[int]],
    cap: list[int],
    nodes: list[int],
    bound: float | None,
    node_first: bool,
) -> list[list[int]]:
    """Largest-first packing of replicas. A replica goes to an actor that already holds the expert when that
    keeps it under `bound`; otherwise to the least loaded node (per actor), then its least loaded actor."""
    A = len(cap)
    E = len(w)
    node_ids = sorted(set(nodes))
    node_size = {n: nodes.count(n) for n in node_ids}
    items = sorted(
        ((w[e] / counts[e], e) for e in range(E) for _ in range(counts[e])), key=lambda t: (-t[0], t[1])
    )
    # numpy masks over the actors per replica (a Python scan of every actor per replica is slow at hundreds of
    # actors); ties go to the lowest actor id (argmin takes the first)
    node_arr = np.asarray(nodes)
    cap_arr = np.asarray(cap)
    load = np.zeros(A)
    used = np.zeros(A, dtype=np.int64)
    held = np.zeros((E, A), dtype=bool)
    orig_mask = np.zeros((E, A), dtype=bool)
    for e in range(E):
        orig_mask[e, list(orig[e])] = True
    node_load = {n: 0.0 for n in node_ids}
    hosts: list[list[int]] = [[] for _ in range(E)]
    for size, e in items:
        cands = (used < cap_arr) & ~held[e]
        if not cands.any():
            continue  # only possible for an extra replica: the expert keeps fewer
        choice = None
        if bound is not None:
            keep = cands & orig_mask[e] & (load + size <= bound)
            if keep.any():
                choice = int(np.argmin(np.where(keep, load, np.inf)))
        if choice is None:
            pool = cands
            if node_first:
                cand_nodes = sorted({int(n) for n in node_arr[cands]},
                                    key=lambda n: (node_load[n] / node_size[n], n))
                pool = cands & (node_arr == cand_nodes[0])
            choice = int(np.argmin(np.where(pool, load, np.inf)))
        hosts[e].append(choice)
        held[e, choice] = True
        load[choice] += size
        used[choice] += 1
        node_load[nodes[choice]] += size
    return [sorted(h) for h in hosts]


def layer_targets(
    layer: LayerState,
    lim: SlotLimits,
    nodes: list[int],
    eplb_row: Sequence[Sequence[int]],
    polish_iters: int,
) -> list[LayerOption]:
    """Candidate whole-layer plans (ignoring the byte budget): LPT variants and EPLB's plan (`eplb_row`, already
    on our actors), all pruned of needless copies; the best, the cheapest and EPLB's also polished."""
    w = np.asarray(layer.w)
    A = layer.num_actors
    counts = replica_counts(w, sum(lim.cap), lim.max_rep)
    lower = max(float(w.sum()) / A, float(np.max(w / np.asarray(counts))))
    lpt: list[LayerState] = []
    seen: set[tuple] = set()
    for node_first in (True, False):
        for slack in KEEP_SLACKS:
            bound = None if slack is None else lower * (1.0 + slack)
            hosts = lpt_target(w, counts, layer.orig, lim.cap, nodes, bound, node_first)
            key = tuple(tuple(h) for h in hosts)
            if key not in seen:
                seen.add(key)
                lpt.append(LayerState(layer.w, hosts, A, layer.orig))
    out: dict[tuple, LayerOption] = {}
    for cand in lpt:
        prune(cand, lim)
        out.setdefault(cand.rows(), LayerOption.of(cand))
    # Polishing costs most of the time: polish the most balanced and the cheapest LPT plan, and EPLB's.
    to_polish = [min(lpt, key=lambda c: (c.max, c.copies)), min(lpt, key=lambda c: (c.copies, c.max))]
    if to_polish[1] is to_polish[0]:
        to_polish.pop()
    cand = LayerState(layer.w, eplb_row, A, layer.orig)
    fits = all(cand.used(a) <= lim.cap[a] for a in range(A)) and all(
        len(h) <= max(lim.max_rep, len(layer.hosts[e])) for e, h in enumerate(cand.hosts)
    )
    if fits:
        prune(cand, lim)
        out.setdefault(cand.rows(), LayerOption.of(cand))
        to_polish.append(cand)
    for cand in to_polish:
        polish(cand, lim, polish_iters)
        prune(cand, lim)
        out.setdefault(cand.rows(), LayerOption.of(cand))
    return list(out.values())
