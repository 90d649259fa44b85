"""Figures for `moe-runtime simulate --plot out.png`: the per-GPU timeline of one simulated step (left) and the
step time against cluster size (right). matplotlib, headless (Agg)."""

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
MAX_ROWS = 64  # devices drawn in the timeline (evenly spaced when there are more)


def plot_simulation(result: SimResult, scaling: Sequence[dict[str, float]], path: str | Path, title: str = "") -> Path:
    if result.timeline is None:
        raise ValueError("plot_simulation needs a SimResult run with record_timeline=True")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [2.2, 1]})
    devices = result.devices
    step = max(1, -(-devices // MAX_ROWS))
    shown = {d: i for i, d in enumerate(range(0, devices, step))}
    seen = set()
    for dev, start, end, kind in zip(result.timeline.device, result.timeline.start, result.timeline.end,
                                     result.timeline.kind):  # fmt: skip
        for d, s, e in zip(dev.tolist(), start.tolist(), end.tolist()):
            if d not in shown:
                continue
            label = kind if kind not in seen else None
            seen.add(kind)
            ax_t.barh(shown[d], (e - s) * 1e3, left=s * 1e3, height=0.8, color=_COLORS.get(kind, "grey"),
                      label=label, linewidth=0)  # fmt: skip
    fb = result.phases.get("forward_backward_s", result.step_time_s)
    ax_t.axvline(fb * 1e3, color="k", linestyle=":", linewidth=1, label="grad sync + optimizer")
    ax_t.axvline(result.step_time_s * 1e3, color="k", linewidth=1)
    ax_t.set_xlabel("time in step (ms)")
    ax_t.set_ylabel("device" + (f" (every {step}th)" if step > 1 else ""))
    ax_t.set_title(f"one step: {result.step_time_s * 1e3:.1f} ms, {result.layout}, {devices} devices, "
                   f"imbalance {result.imbalance:.2f}")  # fmt: skip
    ax_t.legend(loc="upper right", fontsize=8)
    ax_t.invert_yaxis()
    if scaling:
        g = [r["gpus"] for r in scaling]
        ax_s.plot(g, [r["step_time_s"] * 1e3 for r in scaling], "o-", label="step time")
        ax_s.set_xscale("log", base=2)
        ax_s.set_xlabel("GPUs (co-located layout, static placement)")
        ax_s.set_ylabel("step time (ms)")
        ax_s.set_title("step time vs cluster size (same tokens per GPU)")
        ax_s.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
