"""Figures for `moe-runtime simulate --plot out.png`: the per-device timeline of one simulated step (with
`--what-if rebalance`: the static placement and the scheduler's, one above the other on the same time axis) and
the step time against cluster size (right, GPU tables only). matplotlib, headless (Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from moe_runtime.sim.results import SimResult

_COLORS = {
    "dense": "tab:blue", "dense_bwd": "tab:cyan", "head": "tab:purple", "experts": "tab:orange",
    "experts_bwd": "tab:red",
}  # fmt: skip
MAX_ROWS = 64  # devices drawn in a timeline (evenly spaced when there are more)


def _timeline(ax, result: SimResult, heading: str, x_max_ms: float) -> dict[str, object]:
    """Bars of one step per shown device; y ticks are device ids. Returns legend handles by label."""
    devices = result.devices
    every = max(1, -(-devices // MAX_ROWS))
    shown = {d: i for i, d in enumerate(range(0, devices, every))}
    handles: dict[str, object] = {}
    for dev, start, end, kind in zip(result.timeline.device, result.timeline.start, result.timeline.end,
                                     result.timeline.kind):  # fmt: skip
        for d, s, e in zip(dev.tolist(), start.tolist(), end.tolist()):
            if d in shown:
                bar = ax.barh(shown[d], (e - s) * 1e3, left=s * 1e3, height=0.8, color=_COLORS.get(kind, "grey"),
                              linewidth=0)  # fmt: skip
                handles.setdefault(kind, bar)
    fb = result.phases.get("forward_backward_s", result.step_time_s)
    handles["grad sync + optimizer from here"] = ax.axvline(fb * 1e3, color="k", linestyle=":", linewidth=1)
    handles["end of step"] = ax.axvline(result.step_time_s * 1e3, color="k", linewidth=1)
    rows = list(shown)
    tick_every = max(1, len(rows) // 16)
    ax.set_yticks([shown[d] for d in rows[::tick_every]], [str(d) for d in rows[::tick_every]], fontsize=7)
    ax.set_ylabel("device id" + (f" (every {every}th device drawn)" if every > 1 else ""))
    ax.set_xlim(0, x_max_ms * 1.02)
    ax.set_title(f"{heading}: {result.step_time_s * 1e3:.1f} ms, {result.layout}, {devices} devices, "
                 f"imbalance {result.imbalance:.2f}", fontsize=10)  # fmt: skip
    ax.invert_yaxis()
    return handles


def plot_simulation(result: SimResult, scaling: Sequence[dict[str, float]], path: str | Path, title: str = "",
                    rebalanced: SimResult | None = None) -> Path:
    """`result`: one step under the static placement; `rebalanced`: the same step under the scheduler's
    placement (what-if), drawn below it on the same time axis."""
    runs = [("static placement", result)] + ([("scheduler's placement", rebalanced)] if rebalanced else [])
    if any(r.timeline is None for _, r in runs):
        raise ValueError("plot_simulation needs SimResults run with record_timeline=True")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = 2 if scaling else 1
    fig = plt.figure(figsize=(15 if scaling else 11, 4.2 * len(runs) + 0.8))
    grid = fig.add_gridspec(len(runs), cols, width_ratios=[2.2, 1] if scaling else [1])
    x_max = max(r.step_time_s for _, r in runs) * 1e3
    handles: dict[str, object] = {}
    axes = []
    for i, (heading, r) in enumerate(runs):
        ax = fig.add_subplot(grid[i, 0], sharex=axes[0] if axes else None)
        handles.update(_timeline(ax, r, heading if rebalanced else "one step", x_max))
        axes.append(ax)
    axes[-1].set_xlabel("time in step (ms)")
    # the legend goes under the timelines, never over the bars
    fig.legend(list(handles.values()), list(handles), loc="lower left", ncol=min(7, len(handles)), fontsize=8,
               bbox_to_anchor=(0.01, 0.0), frameon=False)
    if scaling:
        ax_s = fig.add_subplot(grid[:, 1])
        g = [r["gpus"] for r in scaling]
        ax_s.plot(g, [r["step_time_s"] * 1e3 for r in scaling], "o-", label="step time")
        ax_s.set_xscale("log", base=2)
        ax_s.set_xlabel("GPUs (co-located layout, static placement)")
        ax_s.set_ylabel("step time (ms)")
        ax_s.set_title("step time vs cluster size (same tokens per GPU)", fontsize=10)
        ax_s.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
