"""Choosing whole-layer options under the shared byte budget and memory: the greedy multiple-choice knapsack
that starts the budgeted search, and the EPLB floor that ends it."""

from __future__ import annotations

from moe_runtime.scheduler.layer import LayerState, memory_left, tolerance
from moe_runtime.scheduler.targets import LayerOption

__all__ = ["eplb_floor", "knapsack"]


def knapsack(
    layers: list[LayerState],
    options: list[list[LayerOption]],
    price: float,
    budget_copies: int | None,
    mem_limit: int | None,
) -> list[LayerState]:
    """Swap in whole-layer targets while they lower the objective, best gain per copy first, while budget and
    memory allow (greedy multiple-choice knapsack)."""
    cur = [LayerOption.of(l) for l in layers]
    mem = memory_left(layers, mem_limit)
    spent = sum(l.copies for l in layers)
    while True:
        best = None
        for li, opts in enumerate(options):
            unit = price * layers[li].mean
            for oi, opt in enumerate(opts):
                extra = opt.copies - cur[li].copies
                gain = (cur[li].max - opt.max) - unit * extra
                if gain <= tolerance(layers[li]) or cur[li].max - opt.max <= tolerance(layers[li]):
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
    return [LayerState(l.w, cur[li].hosts, l.num_actors, l.orig) for li, l in enumerate(layers)]


def eplb_floor(
    layers: list[LayerState],
    options: list[list[LayerOption]],
    floor: list[float],
    budget_copies: int | None,
    mem_limit: int | None,
) -> list[LayerState]:
    """Where it fits the budget and memory, replace a layer whose max load is above EPLB's for that layer by
    the cheapest target that is not: with an unlimited budget the result is never less balanced than EPLB."""
    layers = [l.copy() for l in layers]
    for li, layer in enumerate(layers):
        if layer.max <= floor[li] + tolerance(layer):
            continue
        fits = sorted(
            (o for o in options[li] if o.max <= floor[li] + tolerance(layer)), key=lambda o: (o.copies, o.max)
        )
        spent = sum(l.copies for l in layers)
        mem = memory_left(layers, mem_limit)
        for opt in fits:
            if budget_copies is not None and spent - layer.copies + opt.copies > budget_copies:
                continue
            if mem is not None and any(mem[a] < opt.used[a] - layer.used(a) for a in range(len(mem))):
                continue
            layers[li] = LayerState(layer.w, opt.hosts, layer.num_actors, layer.orig)
            break
    return layers
