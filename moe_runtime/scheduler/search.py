"""Local search over replica changes: drop / move / replicate / replicate-evicting-a-spare-replica / swap, always
taking load off a layer's busiest actor. `polish` and `prune` refine one layer's target (no budget);
`local_search` runs over all layers under the byte budget and memory, best gain per copy first."""

from __future__ import annotations

import math

from moe_runtime.scheduler.layer import Change, LayerState, SlotLimits, memory_left, objective, tolerance

__all__ = ["best_layer_move", "local_search", "polish", "prune"]

PAIR_RECEIVERS = 8  # pair changes (swap, evict) go only to this many of the lightest actors


def enumerate_moves(layer: LayerState, lim: SlotLimits) -> list[tuple[Change, dict[int, float], int]]:
    """Feasible changes that take load off the busiest actor, with their load delta per actor and their
    change in copies: drop, move, replicate, evict-a-spare-replica-and-replicate, swap.

    Changes that would lift the receiving actor above the current max are skipped here: they can never
    lower the max (and for moves and swaps not even the sum of squares)."""
    top = layer.order[0]
    A = layer.num_actors
    loads, w, hosts, orig = layer.loads, layer.w, layer.hosts, layer.orig
    mem = lim.mem_left
    ceiling = loads[top] + tolerance(layer)
    # Pair changes (swap, evict) only with the lightest actors (or one that held the expert before): they
    # have the most room, and this keeps a step O(S * (A + K * S)) instead of O(S^2 * A).
    light = set(layer.order[-PAIR_RECEIVERS:])
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


def best_layer_move(
    layer: LayerState, lim: SlotLimits, bytes_left: int | None
) -> tuple[tuple[int, float], Change, int] | None:
    """Best improving change of a layer: key (tier, score), change, change in copies.

    Improving = lower max, or the same max and a lower sum of squares (to get off plateaus where several
    actors share the max). Score = gain / copies, gain = max drop + a tiny sum-of-squares term; tier 1 =
    changes that add no copies (taken first)."""
    cur_max, cur_sq = layer.max, layer.sumsq
    tol = tolerance(layer)
    sq_tol = tol * max(cur_max, 1.0)
    eps = 1e-6 / layer.num_actors / max(cur_max, 1e-300)
    loads, order = layer.loads, layer.order
    best = None
    for change, delta, copies in enumerate_moves(layer, lim):
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


def polish(layer: LayerState, lim: SlotLimits, max_iters: int) -> None:
    """Unbudgeted local search on one layer (used to refine targets)."""
    for _ in range(max_iters):
        best = best_layer_move(layer, lim, None)
        if best is None:
            return
        layer.apply(best[1])


def prune(layer: LayerState, lim: SlotLimits) -> None:
    """Drop or move back new replicas while the layer's max load does not rise (saves bytes). Passes over the
    experts until one changes nothing (a pass goes on after a change instead of starting over, which is
    quadratic at hundreds of actors; see docs/measurements.md)."""
    # Only the expert's hosts change and the dropped replica's actor only loses load, so checking the hosts
    # that gain is enough (a full re-evaluation per candidate dominated large decisions)
    changed = True
    while changed:
        changed = False
        for e in range(len(layer.hosts)):
            for b in list(layer.hosts[e]):
                hosts = layer.hosts[e]
                if b in layer.orig[e] or b not in hosts:
                    continue
                k, w = len(hosts), layer.w[e]
                limit = layer.max + tolerance(layer)
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


def local_search(
    layers: list[LayerState],
    max_rep: int,
    slots: int,
    mem_limit: int | None,
    price: float,
    budget_copies: int | None,
    max_steps: int,
) -> list[LayerState]:
    """Budgeted local search over all layers, best gain per copy first; returns (as fresh copies) the prefix
    of the move sequence with the lowest objective (ties: fewer copies)."""
    start = [l.copy() for l in layers]
    mem = memory_left(layers, mem_limit)
    lims = [SlotLimits([slots] * l.num_actors, max_rep, mem) for l in layers]
    cache: list = [None] * len(layers)
    dirty = [True] * len(layers)
    history: list[tuple[int, Change]] = []
    spent = sum(l.copies for l in layers)
    best = (objective(layers, price), spent)
    best_len = 0
    tol = 1e-9 * max(1.0, best[0])
    for _ in range(max_steps):
        left = None if budget_copies is None else budget_copies - spent
        for li in range(len(layers)):
            if dirty[li]:
                cache[li] = best_layer_move(layers[li], lims[li], left)
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
        score = (objective(layers, price), spent)
        if score[0] < best[0] - tol or (score[0] <= best[0] + tol and score[1] < best[1]):
            best, best_len = score, len(history)
    for li, change in history[:best_len]:
        start[li].apply(change)
    return start
