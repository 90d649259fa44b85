"""Placement policy: a pure function from (load snapshot, placement, capacities, parameters) to a decision.

No I/O, no clock, no randomness: the same inputs give the same decision. ``migrate.py`` applies it.

Objective. Per layer the bottleneck is the busiest actor (an MoE layer waits for its slowest expert actor),
so balance means a low ``sum_l max_a load[l, a]``, i.e. a high vLLM balancedness ``sum_l mean / sum_l max``
(the mean does not depend on the placement). Loads assume the dispatcher splits a replicated expert's
tokens evenly over its replicas. Bytes have a price: the policy minimises
``J = sum_l (max_l + min_gain_per_copy * mean_l * copies_l)``, so a copy must lower its layer's max load
by at least ``min_gain_per_copy`` (default 1%) of the layer's mean load; 0 chases balance at any cost.
Without that price, ties in the max hide a wide spread in bytes (on a Zipf(1.2) load, plans within 0.3% of
the same max ranged from 13 to 40 copies per layer).

Costs and limits. Copying an expert replica onto an actor that did not hold it before the decision costs
``bytes_per_expert`` (weights + optimizer state); dropping one is free. Per decision at most
``byte_budget`` bytes move. Every actor holds at most ``slots_per_actor`` replicas per layer and at most
``memory_slots_per_actor`` over all layers; every expert keeps >= 1 replica, on distinct actors, and the
policy never raises an expert above ``max_replicas_per_expert`` replicas. No layer's max load ever rises.

Algorithm (layers are independent except for the shared byte budget and memory):
1. Targets per layer, ignoring the budget:
   a. replica counts with EPLB's greedy (one more replica for the expert with the largest load / count)
      over the layer's slots;
   b. assignments that pack the replicas largest-first (LPT), either node first (least loaded node, then
      its least loaded actor, like EPLB's hierarchy) or flat, and that keep a replica on an actor already
      holding the expert whenever that stays under a load bound (zero bytes); five bounds are tried;
   c. DeepSeek EPLB's own plan (``eplb.py``), its GPUs relabelled onto our actors by a maximum-overlap
      assignment (Hungarian), as EPLB's maintainer suggests (EPLB issue #25);
   all are pruned (a new replica that can be dropped, or moved back to an actor that held the expert,
   without raising the layer's max, is), and the most balanced and the cheapest LPT plan and EPLB's are
   also polished by an unpriced local search, giving each layer a menu of (max, copies) options.
2. Under the budget: from the current placement, swap in whole-layer options greedily by J-gain per copy
   (a multiple-choice knapsack) while budget and memory allow.
3. Local search from there (and, separately, from the current placement): drop / move / replicate /
   replicate-evicting-a-spare-replica / swap, always taking load off the busiest actor of a layer, best
   gain per copy first across layers (ties in the max are broken by the sum of squares, to get off
   plateaus); the prefix of the move sequence with the lowest J is kept.
4. EPLB floor: a layer still above EPLB's max load for that layer is replaced by its cheapest option that
   is not, where budget and memory allow. With an unlimited budget (and no memory limit) the result is
   therefore never less balanced than EPLB on the same snapshot.
5. The better candidate (lower J, then fewer bytes) is proposed only when the relative drop of
   ``sum_l max`` is at least ``min_gain``; otherwise the input placement is returned unchanged.
Node balance enters through the node-first packing only; the objective is per actor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from moe_runtime.placement import Placement
from moe_runtime.scheduler.eplb import eplb_placement
from moe_runtime.scheduler.load import LoadSnapshot, actor_loads

if TYPE_CHECKING:
    from moe_runtime.config import SchedulerConfig

__all__ = [
    "Capacities",
    "Move",
    "PlacementDecision",
    "PolicyParams",
    "align_actors",
    "bytes_moved",
    "decide",
]

MoveKind = Literal["replicate", "move", "drop"]


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Capacities:
    """What the cluster can hold and what moving costs.

    slots_per_actor: expert replicas an actor can hold per layer.
    bytes_per_expert: bytes to copy one expert replica (weights + optimizer state, e.g. AdamW m and v).
    actor_nodes: node of each actor; () = take the placement's.
    memory_slots_per_actor: replicas an actor can hold over all layers (its memory, in expert slots);
        None = num_layers * slots_per_actor (no limit beyond the per-layer one).
    """

    slots_per_actor: int
    bytes_per_expert: int
    actor_nodes: tuple[int, ...] = ()
    memory_slots_per_actor: int | None = None

    def __post_init__(self) -> None:
        if self.slots_per_actor <= 0:
            raise ValueError(f"slots_per_actor = {self.slots_per_actor}: must be > 0")
        if self.bytes_per_expert < 0:
            raise ValueError(f"bytes_per_expert = {self.bytes_per_expert}: must be >= 0")
        if self.memory_slots_per_actor is not None and self.memory_slots_per_actor <= 0:
            raise ValueError(f"memory_slots_per_actor = {self.memory_slots_per_actor}: must be > 0")
        object.__setattr__(self, "actor_nodes", tuple(int(n) for n in self.actor_nodes))

    @classmethod
    def from_memory(
        cls,
        slots_per_actor: int,
        bytes_per_expert: int,
        memory_bytes_per_actor: int,
        actor_nodes: Sequence[int] = (),
    ) -> Capacities:
        """Memory given in bytes: it holds memory_bytes_per_actor // bytes_per_expert replicas."""
        if bytes_per_expert <= 0:
            raise ValueError(f"bytes_per_expert = {bytes_per_expert}: must be > 0 to convert memory to slots")
        return cls(
            slots_per_actor, bytes_per_expert, tuple(actor_nodes), memory_bytes_per_actor // bytes_per_expert
        )


@dataclass(frozen=True)
class PolicyParams:
    """min_gain: smallest predicted relative drop of sum_l max actor load worth acting on.
    byte_budget: most bytes copied per decision (None = unlimited).
    max_replicas_per_expert: cap on replicas of one expert (None = number of actors).
    min_gain_per_copy: the price of one expert copy: it must lower its layer's max actor load by at least
        this fraction of the layer's mean actor load (0 = chase any gain regardless of bytes)."""

    min_gain: float = 0.05
    byte_budget: int | None = None
    max_replicas_per_expert: int | None = None
    min_gain_per_copy: float = 0.01

    def __post_init__(self) -> None:
        if not self.min_gain >= 0:
            raise ValueError(f"min_gain = {self.min_gain}: must be >= 0")
        if not self.min_gain_per_copy >= 0:
            raise ValueError(f"min_gain_per_copy = {self.min_gain_per_copy}: must be >= 0")
        if self.byte_budget is not None and self.byte_budget < 0:
            raise ValueError(f"byte_budget = {self.byte_budget}: must be >= 0 or None")
        if self.max_replicas_per_expert is not None and self.max_replicas_per_expert < 1:
            raise ValueError(f"max_replicas_per_expert = {self.max_replicas_per_expert}: must be >= 1")

    @classmethod
    def from_config(cls, cfg: SchedulerConfig, max_replicas_per_expert: int | None = None) -> PolicyParams:
        return cls(
            min_gain=cfg.min_gain,
            byte_budget=int(cfg.byte_budget_mb * 2**20),
            max_replicas_per_expert=max_replicas_per_expert,
            min_gain_per_copy=cfg.min_gain_per_copy,
        )


@dataclass(frozen=True)
class Move:
    """One replica change. kind:
    - "replicate": copy expert from src_actor (a holder before the decision) to dst_actor;
    - "move": copy from src_actor to dst_actor, then src_actor drops it;
    - "drop": dst_actor frees its replica (src_actor is None; no bytes).
    Apply copies before drops: every source still holds the expert when it is copied."""

    layer: int
    expert: int
    src_actor: int | None
    dst_actor: int
    kind: MoveKind


@dataclass(frozen=True)
class PlacementDecision:
    placement: Placement  # the input placement itself when unchanged; else version + 1
    changed: bool
    replica_counts: tuple[tuple[int, ...], ...]  # [layer][expert] of `placement`
    moves: tuple[Move, ...]
    balancedness_before: float
    balancedness_after: float
    bytes_to_move: int
    reason: str
    layer_max_before: tuple[float, ...] = field(default=())
    layer_max_after: tuple[float, ...] = field(default=())


def bytes_moved(old: Placement, new: Placement, bytes_per_expert: int) -> int:
    """bytes_per_expert x number of (layer, expert, actor) replicas in `new` that are not in `old`."""
    if (old.num_layers, old.num_experts) != (new.num_layers, new.num_experts):
        raise ValueError(
            f"placements differ in shape: {old.num_layers}x{old.num_experts} vs {new.num_layers}x{new.num_experts}"
        )
    copies = 0
    for old_row, new_row in zip(old.replicas, new.replicas):
        for old_actors, new_actors in zip(old_row, new_row):
            copies += len(set(new_actors) - set(old_actors))
    return copies * bytes_per_expert


# ----------------------------------------------------------------------------------------------- helpers


def _hungarian(cost: np.ndarray) -> list[int]:
    """Minimum-cost perfect matching of a square matrix: returns col[row]. O(n^3), first index on ties."""
    n = cost.shape[0]
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    p = np.zeros(n + 1, dtype=np.int64)  # p[j] = row matched to column j (1-based; 0 = none)
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    col = [0] * n
    for j in range(1, n + 1):
        col[p[j] - 1] = j - 1
    return col


def _align_layer(
    new_row: Sequence[Sequence[int]], old_row: Sequence[Sequence[int]], num_actors: int
) -> list[list[int]]:
    """Relabel the actors of one layer of `new_row` to maximise replicas that stay where they are."""
    overlap = np.zeros((num_actors, num_actors))
    for e, (new_actors, old_actors) in enumerate(zip(new_row, old_row)):
        for g in new_actors:
            for a in old_actors:
                overlap[g, a] += 1.0
    perm = _hungarian(-overlap)
    return [sorted(perm[g] for g in actors) for actors in new_row]


def align_actors(new: Placement, old: Placement) -> Placement:
    """`new` with its actors relabelled per layer (a maximum-overlap assignment) to keep most replicas where
    `old` has them. Per-actor loads are permuted, so balance is unchanged; bytes moved can only drop.
    Relabelling ignores nodes: it may move a whole actor's set to another node."""
    if new.num_actors != old.num_actors:
        raise ValueError(f"num_actors differ: {new.num_actors} vs {old.num_actors}")
    rows = tuple(
        tuple(tuple(a) for a in _align_layer(new_row, old_row, new.num_actors))
        for new_row, old_row in zip(new.replicas, old.replicas)
    )
    return Placement(new.num_actors, rows, new.version, new.actor_nodes)


# ----------------------------------------------------------------------------------------------- layer state

# A change is a tuple of (expert, actor, +1 add / -1 remove).
Change = tuple[tuple[int, int, int], ...]


class _Layer:
    """Mutable working state of one layer: hosts per expert, experts per actor, loads."""

    __slots__ = ("copies", "hosts", "loads", "mean", "num_actors", "on", "order", "orig", "sumsq", "w")

    def __init__(
        self,
        w: Sequence[float],
        hosts: Sequence[Sequence[int]],
        num_actors: int,
        orig: Sequence[frozenset[int]],
    ):
        self.w = [float(x) for x in w]
        self.num_actors = num_actors
        self.hosts = [sorted(h) for h in hosts]
        self.orig = list(orig)
        self.on: list[list[int]] = [[] for _ in range(num_actors)]
        for e, h in enumerate(self.hosts):
            for a in h:
                self.on[a].append(e)
        self.mean = sum(self.w) / num_actors
        self.copies = self.new_copies()
        self._recompute()

    def _recompute(self) -> None:
        loads = [0.0] * self.num_actors
        for e, h in enumerate(self.hosts):
            share = self.w[e] / len(h)
            for a in h:
                loads[a] += share
        self.loads = loads
        self._reorder()

    def _reorder(self) -> None:
        self.sumsq = sum(x * x for x in self.loads)
        self.order = sorted(range(self.num_actors), key=lambda a: (-self.loads[a], a))

    def copy(self) -> _Layer:
        return _Layer(self.w, self.hosts, self.num_actors, self.orig)

    @property
    def max(self) -> float:
        return self.loads[self.order[0]]

    def used(self, a: int) -> int:
        return len(self.on[a])

    def new_copies(self) -> int:
        return sum(1 for e, h in enumerate(self.hosts) for a in h if a not in self.orig[e])

    def evaluate(self, change: Change) -> tuple[float, float, dict[int, float]]:
        """(new max, new sum of squares, load delta per actor) if `change` were applied."""
        per_expert: dict[int, list[tuple[int, int]]] = {}
        for e, a, s in change:
            per_expert.setdefault(e, []).append((a, s))
        delta: dict[int, float] = {}
        for e, edits in per_expert.items():
            old = self.hosts[e]
            new = set(old)
            for a, s in edits:
                if s > 0:
                    new.add(a)
                else:
                    new.discard(a)
            w = self.w[e]
            old_share, new_share = w / len(old), w / len(new)
            for a in old:
                delta[a] = delta.get(a, 0.0) - old_share
            for a in new:
                delta[a] = delta.get(a, 0.0) + new_share
        loads = self.loads
        new_max = -math.inf
        sumsq = self.sumsq
        for a, d in delta.items():
            x = loads[a] + d
            new_max = max(new_max, x)
            sumsq += x * x - loads[a] * loads[a]
        for a in self.order:
            if a not in delta:
                new_max = max(new_max, loads[a])
                break
        return new_max, sumsq, delta

    def apply(self, change: Change) -> None:
        self.copies += self.byte_delta(change)
        for e, a, s in change:
            if s > 0:
                self.hosts[e].append(a)
                self.hosts[e].sort()
                self.on[a].append(e)
                self.on[a].sort()
            else:
                self.hosts[e].remove(a)
                self.on[a].remove(e)
        self._recompute()

    def byte_delta(self, change: Change) -> int:
        """Change in the number of replicas not present before the decision."""
        return sum(s for e, a, s in change if a not in self.orig[e])

    def rows(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(h) for h in self.hosts)


@dataclass
class _Limits:
    cap: list[int]  # slots per actor in this layer
    max_rep: int
    mem_left: list[int] | None  # free memory slots per actor (shared over layers); None = unchecked

    def slot_ok(self, layer: _Layer, change: Change) -> bool:
        net: dict[int, int] = {}
        for _, a, s in change:
            net[a] = net.get(a, 0) + s
        for a, n in net.items():
            if n > 0:
                if layer.used(a) + n > self.cap[a]:
                    return False
                if self.mem_left is not None and n > self.mem_left[a]:
                    return False
        return True


_PAIR_RECEIVERS = 8


def _enumerate_moves(layer: _Layer, lim: _Limits) -> list[tuple[Change, dict[int, float], int]]:
    """Feasible changes that take load off the busiest actor, with their load delta per actor and their
    change in copies: drop, move, replicate, evict-a-spare-replica-and-replicate, swap.

    Changes that would lift the receiving actor above the current max are skipped here: they can never
    lower the max (and for moves and swaps not even the sum of squares)."""
    top = layer.order[0]
    A = layer.num_actors
    loads, w, hosts, orig = layer.loads, layer.w, layer.hosts, layer.orig
    mem = lim.mem_left
    ceiling = loads[top] + _tol(layer)
    # Pair changes (swap, evict) only with the lightest actors (or one that held the expert before): they
    # have the most room, and this keeps a step O(S * (A + K * S)) instead of O(S^2 * A).
    light = set(layer.order[-_PAIR_RECEIVERS:])
    out: list[tuple[Change, dict[int, float], int]] = []
    for e in layer.on[top]:
        h = hosts[e]
        c = len(h)
        share = w[e] / c
        more = w[e] / (c + 1)
        can_grow = c < lim.max_rep
        top_new = top not in orig[e]  # is the replica on `top` a copy made by this decision?
        if c >= 2:
            less = w[e] / (c - 1)
            delta = {a: less - share for a in h}
            delta[top] = -share
            out.append((((e, top, -1),), delta, -top_new))
        for b in range(A):
            if b == top or b in h:
                continue
            b_new = b not in orig[e]
            if layer.used(b) < lim.cap[b] and (mem is None or mem[b] > 0):
                if loads[b] + share < ceiling:
                    out.append((((e, top, -1), (e, b, +1)), {top: -share, b: share}, b_new - top_new))
                if can_grow and loads[b] + more < ceiling:
                    delta = {a: more - share for a in h}
                    delta[b] = more
                    out.append((((e, b, +1),), delta, b_new))
            if b not in light and b_new:
                continue
            for f in layer.on[b]:
                if f == e:
                    continue
                hf = hosts[f]
                f_share = w[f] / len(hf)
                if can_grow and len(hf) >= 2 and loads[b] - f_share + more < ceiling:
                    f_less = w[f] / (len(hf) - 1)
                    delta = {a: f_less - f_share for a in hf}
                    for a in h:
                        delta[a] = delta.get(a, 0.0) + more - share
                    delta[b] = more - f_share
                    out.append((((f, b, -1), (e, b, +1)), delta, b_new - (b not in orig[f])))
                if f_share < share and top not in hf and loads[b] + share - f_share < ceiling:
                    d = share - f_share
                    copies = b_new - top_new + (top not in orig[f]) - (b not in orig[f])
                    out.append(
                        (((e, top, -1), (e, b, +1), (f, b, -1), (f, top, +1)), {top: -d, b: d}, copies)
                    )
    return out


def _tol(layer: _Layer) -> float:
    return 1e-9 * max(1.0, layer.max)


def _best_layer_move(
    layer: _Layer, lim: _Limits, bytes_left: int | None
) -> tuple[tuple[int, float], Change, int] | None:
    """Best improving change of a layer: key (tier, score), change, change in copies.

    Improving = lower max, or the same max and a lower sum of squares (to get off plateaus where several
    actors share the max). Score = gain / copies, gain = max drop + a tiny sum-of-squares term; tier 1 =
    changes that add no copies (taken first)."""
    cur_max, cur_sq = layer.max, layer.sumsq
    tol = _tol(layer)
    sq_tol = tol * max(cur_max, 1.0)
    eps = 1e-6 / layer.num_actors / max(cur_max, 1e-300)
    loads, order = layer.loads, layer.order
    best = None
    for change, delta, copies in _enumerate_moves(layer, lim):
        if bytes_left is not None and copies > bytes_left:
            continue
        new_max = -math.inf
        new_sq = cur_sq
        for a, d in delta.items():
            x = loads[a] + d
            new_max = max(new_max, x)
            new_sq += d * (2.0 * loads[a] + d)
        if new_max > cur_max + tol:
            continue
        for a in order:
            if a not in delta:
                new_max = max(new_max, loads[a])
                break
        if new_max > cur_max + tol:
            continue
        drop = cur_max - new_max
        if drop <= tol and new_sq >= cur_sq - sq_tol:
            continue
        gain = max(drop, 0.0) + eps * (cur_sq - new_sq)
        if gain <= 0:
            continue
        key = (1, gain) if copies <= 0 else (0, gain / copies)
        if best is None or key > best[0]:
            best = (key, change, copies)
    return best


def _polish(layer: _Layer, lim: _Limits, max_iters: int) -> None:
    """Unbudgeted local search on one layer (used to refine targets)."""
    for _ in range(max_iters):
        best = _best_layer_move(layer, lim, None)
        if best is None:
            return
        layer.apply(best[1])


def _prune(layer: _Layer, lim: _Limits) -> None:
    """Drop or move back new replicas while the layer's max load does not rise (saves bytes). Passes over the
    experts until one changes nothing (a pass goes on after a change instead of starting over: at 256 actors
    starting over made this quadratic, 28 s of a 74 s decision)."""
    # The checks are evaluate()'s for these two shapes of change, inlined (no actor outside the expert's hosts
    # changes, and the dropped replica's actor only loses load): 15 s of evaluate() calls at 256 actors
    changed = True
    while changed:
        changed = False
        for e in range(len(layer.hosts)):
            for b in list(layer.hosts[e]):
                hosts = layer.hosts[e]
                if b in layer.orig[e] or b not in hosts:
                    continue
                k, w = len(hosts), layer.w[e]
                limit = layer.max + _tol(layer)
                loads = layer.loads
                change: Change | None = None
                if k >= 2:  # drop b: the other k - 1 hosts take its share
                    inc = w / (k - 1) - w / k
                    if all(loads[x] + inc <= limit for x in hosts if x != b):
                        change = ((e, b, -1),)
                if change is None:  # move b back to an actor that held the expert before
                    for a in sorted(layer.orig[e]):
                        if a in hosts or layer.used(a) >= lim.cap[a]:
                            continue
                        ch = ((e, b, -1), (e, a, +1))
                        if lim.slot_ok(layer, ch) and loads[a] + w / k <= limit:
                            change = ch
                            break
                if change is not None:
                    layer.apply(change)
                    changed = True


def _replica_counts(w: np.ndarray, total: int, max_rep: int) -> list[int]:
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


def _lpt_target(
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
    # numpy masks over the actors per replica (a Python scan of every actor per replica took 14 s of a 74 s
    # decision at 256 actors); ties go to the lowest actor id, as before (argmin takes the first)
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
                cand_nodes = sorted({int(n) for n in node_arr[cands]}, key=lambda n: (node_load[n] / node_size[n], n))
                pool = cands & (node_arr == cand_nodes[0])
            choice = int(np.argmin(np.where(pool, load, np.inf)))
        hosts[e].append(choice)
        held[e, choice] = True
        load[choice] += size
        used[choice] += 1
        node_load[nodes[choice]] += size
    return [sorted(h) for h in hosts]


def _node_max(layer: _Layer, nodes: list[int]) -> float:
    per: dict[int, float] = {}
    for a, x in enumerate(layer.loads):
        per[nodes[a]] = per.get(nodes[a], 0.0) + x
    return max(per.values())


@dataclass
class _Option:
    hosts: tuple[tuple[int, ...], ...]
    max: float
    copies: int
    used: list[int]

    @classmethod
    def of(cls, layer: _Layer) -> _Option:
        return cls(layer.rows(), layer.max, layer.copies, [layer.used(a) for a in range(layer.num_actors)])


def _layer_targets(
    layer: _Layer,
    lim: _Limits,
    nodes: list[int],
    eplb_row: Sequence[Sequence[int]] | None,
    polish_iters: int,
) -> list[_Option]:
    """Candidate whole-layer plans (ignoring the byte budget): LPT variants and EPLB's plan aligned to the
    current actors, all pruned of needless copies; the best, the cheapest and EPLB's also polished."""
    w = np.asarray(layer.w)
    A = layer.num_actors
    counts = _replica_counts(w, sum(lim.cap), lim.max_rep)
    lower = max(float(w.sum()) / A, float(np.max(w / np.asarray(counts))))
    lpt: list[_Layer] = []
    seen: set[tuple] = set()
    for node_first in (True, False):
        for slack in (None, 0.0, 0.05, 0.15, math.inf):
            bound = None if slack is None else lower * (1.0 + slack)
            hosts = _lpt_target(w, counts, layer.orig, lim.cap, nodes, bound, node_first)
            key = tuple(tuple(h) for h in hosts)
            if key not in seen:
                seen.add(key)
                lpt.append(_Layer(layer.w, hosts, A, layer.orig))
    out: dict[tuple, _Option] = {}
    for cand in lpt:
        _prune(cand, lim)
        out.setdefault(cand.rows(), _Option.of(cand))
    # Polishing costs most of the time: polish the most balanced and the cheapest LPT plan, and EPLB's.
    to_polish = [min(lpt, key=lambda c: (c.max, c.copies)), min(lpt, key=lambda c: (c.copies, c.max))]
    if to_polish[1] is to_polish[0]:
        to_polish.pop()
    if eplb_row is not None:
        cand = _Layer(layer.w, _align_layer(eplb_row, layer.hosts, A), A, layer.orig)
        fits = all(cand.used(a) <= lim.cap[a] for a in range(A)) and all(
            len(h) <= max(lim.max_rep, len(layer.hosts[e])) for e, h in enumerate(cand.hosts)
        )
        if fits:
            _prune(cand, lim)
            out.setdefault(cand.rows(), _Option.of(cand))
            to_polish.append(cand)
    for cand in to_polish:
        _polish(cand, lim, polish_iters)
        _prune(cand, lim)
        out.setdefault(cand.rows(), _Option.of(cand))
    return list(out.values())


# ----------------------------------------------------------------------------------------------- search


def _objective(layers: Sequence[_Layer], price: float) -> float:
    """sum_l (max load + price x layer mean x copies): a copy must lower its layer's max by price x mean."""
    return sum(l.max + price * l.mean * l.copies for l in layers)


def _mem_left(layers: Sequence[_Layer], limit: int | None) -> list[int] | None:
    if limit is None:
        return None
    A = layers[0].num_actors
    return [limit - sum(l.used(a) for l in layers) for a in range(A)]


def _knapsack(
    layers: list[_Layer],
    options: list[list[_Option]],
    price: float,
    budget_copies: int | None,
    mem_limit: int | None,
) -> list[_Layer]:
    """Swap in whole-layer targets while they lower the objective, best gain per copy first, while budget and
    memory allow (greedy multiple-choice knapsack)."""
    cur = [_Option.of(l) for l in layers]
    mem = _mem_left(layers, mem_limit)
    spent = sum(l.copies for l in layers)
    while True:
        best = None
        for li, opts in enumerate(options):
            unit = price * layers[li].mean
            for oi, opt in enumerate(opts):
                extra = opt.copies - cur[li].copies
                gain = (cur[li].max - opt.max) - unit * extra
                if gain <= _tol(layers[li]) or cur[li].max - opt.max <= _tol(layers[li]):
                    continue
                if budget_copies is not None and spent + extra > budget_copies:
                    continue
                if mem is not None and any(mem[a] < opt.used[a] - cur[li].used[a] for a in range(len(mem))):
                    continue
                key = (1, gain) if extra <= 0 else (0, gain / extra)
                if best is None or key > best[0]:
                    best = (key, li, oi)
        if best is None:
            break
        _, li, oi = best
        opt = options[li][oi]
        spent += opt.copies - cur[li].copies
        if mem is not None:
            mem = [mem[a] - (opt.used[a] - cur[li].used[a]) for a in range(len(mem))]
        cur[li] = opt
    return [_Layer(l.w, cur[li].hosts, l.num_actors, l.orig) for li, l in enumerate(layers)]


def _local_search(
    layers: list[_Layer],
    max_rep: int,
    slots: int,
    mem_limit: int | None,
    price: float,
    budget_copies: int | None,
    max_steps: int,
) -> list[_Layer]:
    """Budgeted local search over all layers, best gain per copy first; returns (as fresh copies) the prefix
    of the move sequence with the lowest objective (ties: fewer copies)."""
    start = [l.copy() for l in layers]
    mem = _mem_left(layers, mem_limit)
    lims = [_Limits([slots] * l.num_actors, max_rep, mem) for l in layers]
    cache: list = [None] * len(layers)
    dirty = [True] * len(layers)
    history: list[tuple[int, Change]] = []
    spent = sum(l.copies for l in layers)
    best = (_objective(layers, price), spent)
    best_len = 0
    tol = 1e-9 * max(1.0, best[0])
    for _ in range(max_steps):
        left = None if budget_copies is None else budget_copies - spent
        for li in range(len(layers)):
            if dirty[li]:
                cache[li] = _best_layer_move(layers[li], lims[li], left)
                dirty[li] = False
        pick = None
        for li, c in enumerate(cache):
            if c is not None and (pick is None or c[0] > cache[pick][0]):
                pick = li
        if pick is None:
            break
        _, change, copies = cache[pick]
        dirty[pick] = True
        if (left is not None and copies > left) or not lims[pick].slot_ok(layers[pick], change):
            continue  # stale: budget or memory was used by another layer since; recomputed next round
        layers[pick].apply(change)
        if mem is not None:
            for _, a, s in change:
                mem[a] -= s
        spent += copies
        if copies < 0:
            dirty = [True] * len(layers)  # budget freed: other layers may have better moves now
        history.append((pick, change))
        score = (_objective(layers, price), spent)
        if score[0] < best[0] - tol or (score[0] <= best[0] + tol and score[1] < best[1]):
            best, best_len = score, len(history)
    for li, change in history[:best_len]:
        start[li].apply(change)
    return start


def _eplb_floor(
    layers: list[_Layer],
    options: list[list[_Option]],
    floor: list[float],
    budget_copies: int | None,
    mem_limit: int | None,
) -> list[_Layer]:
    """Where it fits the budget and memory, replace a layer whose max load is above EPLB's for that layer by
    the cheapest target that is not: with an unlimited budget the result is never less balanced than EPLB."""
    layers = [l.copy() for l in layers]
    for li, layer in enumerate(layers):
        if layer.max <= floor[li] + _tol(layer):
            continue
        fits = sorted(
            (o for o in options[li] if o.max <= floor[li] + _tol(layer)), key=lambda o: (o.copies, o.max)
        )
        spent = sum(l.copies for l in layers)
        mem = _mem_left(layers, mem_limit)
        for opt in fits:
            if budget_copies is not None and spent - layer.copies + opt.copies > budget_copies:
                continue
            if mem is not None and any(mem[a] < opt.used[a] - layer.used(a) for a in range(len(mem))):
                continue
            layers[li] = _Layer(layer.w, opt.hosts, layer.num_actors, layer.orig)
            break
    return layers


# ----------------------------------------------------------------------------------------------- decide


def _validate(snapshot: LoadSnapshot, placement: Placement, caps: Capacities) -> list[int]:
    L, E, A = placement.num_layers, placement.num_experts, placement.num_actors
    if snapshot.tokens.shape != (L, E):
        raise ValueError(
            f"snapshot tokens shape {snapshot.tokens.shape}: placement has {L} layers x {E} experts"
        )
    if caps.actor_nodes and placement.actor_nodes and caps.actor_nodes != placement.actor_nodes:
        raise ValueError(
            f"caps.actor_nodes {caps.actor_nodes} != placement.actor_nodes {placement.actor_nodes}"
        )
    nodes = list(caps.actor_nodes or placement.actor_nodes or (0,) * A)
    if len(nodes) != A:
        raise ValueError(f"actor_nodes has {len(nodes)} entries: placement has {A} actors")
    per_actor_total = [0] * A
    for layer, row in enumerate(placement.replicas):
        used = [0] * A
        for actors in row:
            for a in actors:
                used[a] += 1
        for a in range(A):
            if used[a] > caps.slots_per_actor:
                raise ValueError(
                    f"placement has {used[a]} replicas on actor {a} in layer {layer}: "
                    f"more than slots_per_actor = {caps.slots_per_actor}"
                )
            per_actor_total[a] += used[a]
    if caps.memory_slots_per_actor is not None:
        for a in range(A):
            if per_actor_total[a] > caps.memory_slots_per_actor:
                raise ValueError(
                    f"placement has {per_actor_total[a]} replicas on actor {a}: more than "
                    f"memory_slots_per_actor = {caps.memory_slots_per_actor}"
                )
    return nodes


def _diff_moves(old: Placement, new: Placement, nodes: list[int]) -> tuple[Move, ...]:
    moves: list[Move] = []
    for layer, (old_row, new_row) in enumerate(zip(old.replicas, new.replicas)):
        for e, (old_a, new_a) in enumerate(zip(old_row, new_row)):
            removed = sorted(set(old_a) - set(new_a))
            added = sorted(set(new_a) - set(old_a))
            kept = sorted(set(old_a) & set(new_a))
            for b in added:
                if removed:
                    same = [a for a in removed if nodes[a] == nodes[b]]
                    src = (same or removed)[0]
                    removed.remove(src)
                    moves.append(Move(layer, e, src, b, "move"))
                else:
                    pool = kept or sorted(old_a)
                    same = [a for a in pool if nodes[a] == nodes[b]]
                    moves.append(Move(layer, e, (same or pool)[0], b, "replicate"))
            for a in removed:
                moves.append(Move(layer, e, None, a, "drop"))
    return tuple(moves)


def decide(
    snapshot: LoadSnapshot, placement: Placement, caps: Capacities, cfg: PolicyParams
) -> PlacementDecision:
    """Propose a new placement for the load in `snapshot` (see the module docstring). Pure and deterministic."""
    nodes = _validate(snapshot, placement, caps)
    W = np.asarray(snapshot.tokens, dtype=np.float64)
    L, E, A = placement.num_layers, placement.num_experts, placement.num_actors
    B = caps.bytes_per_expert
    mem_limit = caps.memory_slots_per_actor
    max_rep = min(A, cfg.max_replicas_per_expert or A)
    if cfg.byte_budget is None or B == 0:
        budget_copies = None
    else:
        budget_copies = cfg.byte_budget // B

    loads0 = actor_loads(W, placement)
    max0 = loads0.max(axis=1)
    mean_total = float(loads0.mean(axis=1).sum())
    bal0 = mean_total / float(max0.sum()) if mean_total > 0 else 1.0

    def unchanged(reason: str) -> PlacementDecision:
        return PlacementDecision(
            placement,
            False,
            tuple(tuple(r) for r in placement.replica_counts()),
            (),
            bal0,
            bal0,
            0,
            reason,
            tuple(map(float, max0)),
            tuple(map(float, max0)),
        )

    if mean_total <= 0:
        return unchanged("no load recorded: nothing to balance")

    orig = [[frozenset(a) for a in row] for row in placement.replicas]
    base = [_Layer(W[l], placement.replicas[l], A, orig[l]) for l in range(L)]
    mem_left = _mem_left(base, mem_limit)
    price = cfg.min_gain_per_copy
    slots = caps.slots_per_actor
    polish_iters = 4 * E
    max_steps = 4 * L * E

    # Whole-layer targets (ours and EPLB's aligned to the current actors), ignoring the budget.
    eplb_rows = eplb_placement(W, A, slots, nodes).replicas
    options = []
    floor = []
    for l in range(L):
        cap = (
            [slots] * A if mem_left is None else [min(slots, base[l].used(a) + mem_left[a]) for a in range(A)]
        )
        lim = _Limits(cap, max_rep, None)  # memory over layers is checked when targets are combined
        options.append(_layer_targets(base[l], lim, nodes, eplb_rows[l], polish_iters))
        floor.append(_Layer(W[l], eplb_rows[l], A, orig[l]).max)

    # Candidate 1: local search from the current placement. Candidate 2: targets first, then local search.
    cand1 = _local_search(
        [l.copy() for l in base], max_rep, slots, mem_limit, price, budget_copies, max_steps
    )
    cand2 = _knapsack(base, options, price, budget_copies, mem_limit)
    cand2 = _local_search(cand2, max_rep, slots, mem_limit, price, budget_copies, max_steps)
    cand1 = _eplb_floor(cand1, options, floor, budget_copies, mem_limit)
    cand2 = _eplb_floor(cand2, options, floor, budget_copies, mem_limit)

    def score(layers: list[_Layer]) -> tuple[float, int]:
        return (_objective(layers, price), sum(l.copies for l in layers))

    s1, s2 = score(cand1), score(cand2)
    tol = 1e-9 * max(1.0, s1[0])
    best = cand2 if (s2[0] < s1[0] - tol or (abs(s2[0] - s1[0]) <= tol and s2[1] < s1[1])) else cand1
    new_placement = placement.with_replicas(tuple(l.rows() for l in best))
    max1 = actor_loads(W, new_placement).max(axis=1)
    old_sum, new_sum = float(max0.sum()), float(max1.sum())
    bal1 = mean_total / new_sum
    moved = bytes_moved(placement, new_placement, B)
    gain = (old_sum - new_sum) / old_sum
    if gain <= 1e-12:
        return unchanged(
            f"no placement within the limits lowers the max actor load (balancedness {bal0:.4f})"
        )
    if gain < cfg.min_gain:
        return unchanged(
            f"predicted gain {gain:.2%} < min_gain {cfg.min_gain:.2%} "
            f"(balancedness {bal0:.4f} -> {bal1:.4f}, {moved} bytes): kept"
        )
    moves = _diff_moves(placement, new_placement, nodes)
    kinds = {k: sum(1 for m in moves if m.kind == k) for k in ("replicate", "move", "drop")}
    budget_txt = "unlimited" if cfg.byte_budget is None else f"{cfg.byte_budget}"
    reason = (
        f"balancedness {bal0:.4f} -> {bal1:.4f} (sum of per-layer max load -{gain:.2%}); "
        f"{kinds['replicate']} replicate, {kinds['move']} move, {kinds['drop']} drop; "
        f"{moved} bytes of budget {budget_txt}"
    )
    return PlacementDecision(
        placement=new_placement,
        changed=True,
        replica_counts=tuple(tuple(r) for r in new_placement.replica_counts()),
        moves=moves,
        balancedness_before=bal0,
        balancedness_after=bal1,
        bytes_to_move=moved,
        reason=reason,
        layer_max_before=tuple(map(float, max0)),
        layer_max_after=tuple(map(float, max1)),
    )
