"""What a simulated step reports: SimResult (JSON via ``to_dict``), the busy timeline, the mean over steps."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from moe_runtime.sim.hardware import LINK_CLASSES
from moe_runtime.sim.layout import SimError

__all__ = ["SimResult", "Timeline", "summarize"]


@dataclass
class Timeline:
    """Busy intervals per device: one per (device, wave): from the first job's start to the last job's end."""

    device: list[np.ndarray] = field(default_factory=list)
    start: list[np.ndarray] = field(default_factory=list)
    end: list[np.ndarray] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)  # one per appended block
    layer: list[int] = field(default_factory=list)

    def add(self, device: np.ndarray, start: np.ndarray, end: np.ndarray, kind: str, layer: int) -> None:
        keep = np.isfinite(start) & (end > start)
        if keep.any():
            self.device.append(np.asarray(device)[keep])
            self.start.append(start[keep])
            self.end.append(end[keep])
            self.kind.append(kind)
            self.layer.append(layer)

    def rows(self) -> list[tuple[int, float, float, str, int]]:
        out = []
        for d, s, e, k, layer in zip(self.device, self.start, self.end, self.kind, self.layer):
            out += [(int(a), float(b), float(c), k, layer) for a, b, c in zip(d, s, e)]
        return out


@dataclass
class SimResult:
    step_time_s: float
    per_layer_s: list[float]  # per layer: forward + backward span (first dense start to last reply), summed
    gpu_busy_fraction: list[float]  # per device: compute busy time / step time
    bytes_moved_per_step: float  # data plane: dispatch + combine, forward + backward, all link classes
    bytes_by_class: dict[str, float]
    grad_sync_bytes_per_step: float
    imbalance: float  # sum_l max_a rows / sum_l mean_a rows (forward; scheduler.load's definition)
    phases: dict[str, float]
    layout: str
    devices: int
    workers: int
    actors: int
    messages_per_step: int
    timeline: Timeline | None = None
    overlap: str = "none"  # the schedule simulated: "two_batch" (halves pipelined) or "none"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("timeline")
        d["gpu_busy_mean"] = float(np.mean(self.gpu_busy_fraction)) if self.gpu_busy_fraction else 0.0
        return d


def summarize(results: list[SimResult]) -> dict[str, Any]:
    """Mean over steps of the scalar metrics; per-layer and per-GPU lists averaged elementwise."""
    if not results:
        raise SimError("no results to summarize")
    n = len(results)
    first = results[0].to_dict()
    out: dict[str, Any] = dict(first)
    for key in ("step_time_s", "bytes_moved_per_step", "grad_sync_bytes_per_step", "imbalance"):
        out[key] = float(np.mean([getattr(r, key) for r in results]))
    out["per_layer_s"] = np.mean([r.per_layer_s for r in results], axis=0).tolist()
    out["gpu_busy_fraction"] = np.mean([r.gpu_busy_fraction for r in results], axis=0).tolist()
    out["gpu_busy_mean"] = float(np.mean(out["gpu_busy_fraction"]))
    out["phases"] = {k: float(np.mean([r.phases[k] for r in results])) for k in first["phases"]}
    out["bytes_by_class"] = {k: float(np.mean([r.bytes_by_class[k] for r in results])) for k in LINK_CLASSES}
    out["step_time_s_per_step"] = [r.step_time_s for r in results]
    out["steps"] = n
    return out
