"""Per-expert load: immutable snapshots, balance metrics, and an EMA tracker that records steps for replay.

Metrics follow vLLM / SGLang: per layer, the load of an actor is the tokens it serves; a replicated expert's
tokens are split evenly over its replicas (what the dispatcher does). Over layers,
``imbalance = sum_l max_a load[l, a] / sum_l mean_a load[l, a]`` and ``balancedness = 1 / imbalance``
(mean/max, vLLM's definition). A layer (or a snapshot) with no tokens counts as perfectly balanced (1.0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moe_runtime.placement import Placement, expected_actor_loads

if TYPE_CHECKING:
    from moe_runtime.config import SchedulerConfig

__all__ = [
    "LoadSnapshot",
    "LoadTracker",
    "actor_loads",
    "balancedness",
    "imbalance",
    "imbalance_per_layer",
]


def _as_tokens(tokens: object, what: str = "tokens") -> np.ndarray:
    arr = np.array(tokens, dtype=np.float64)  # always a copy
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty [layers, experts] matrix, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or Inf")
    if np.any(arr < 0):
        layer, expert = map(int, np.argwhere(arr < 0)[0])
        raise ValueError(f"{what}[{layer}][{expert}] = {arr[layer, expert]}: must be >= 0")
    return arr


def actor_loads(tokens: np.ndarray, placement: Placement) -> np.ndarray:
    """[L, A] tokens served per actor: each expert's tokens split evenly over its replicas
    (placement.expected_actor_loads per layer)."""
    tokens = np.asarray(tokens, dtype=np.float64)
    if tokens.shape != (placement.num_layers, placement.num_experts):
        raise ValueError(
            f"tokens shape {tokens.shape} does not match placement "
            f"({placement.num_layers} layers, {placement.num_experts} experts)"
        )
    loads = np.zeros((placement.num_layers, placement.num_actors))
    for layer, row in enumerate(placement.replicas):
        loads[layer] = expected_actor_loads(tokens[layer].tolist(), row, placement.num_actors)
    return loads


def _ratio(maxes: np.ndarray, means: np.ndarray) -> np.ndarray:
    out = np.ones_like(maxes)
    np.divide(maxes, means, out=out, where=means > 0)
    return out


def imbalance_per_layer(tokens: np.ndarray, placement: Placement) -> np.ndarray:
    """[L] max / mean actor load of each layer (1.0 for a layer without tokens)."""
    loads = actor_loads(tokens, placement)
    return _ratio(loads.max(axis=1), loads.mean(axis=1))


def imbalance(tokens: np.ndarray, placement: Placement) -> float:
    """sum_l max_a load / sum_l mean_a load (>= 1; 1.0 when there are no tokens)."""
    loads = actor_loads(tokens, placement)
    total_mean = float(loads.mean(axis=1).sum())
    return float(loads.max(axis=1).sum()) / total_mean if total_mean > 0 else 1.0


def balancedness(tokens: np.ndarray, placement: Placement) -> float:
    """sum_l mean / sum_l max, in (0, 1] (vLLM's balancedness); 1.0 when there are no tokens."""
    return 1.0 / imbalance(tokens, placement)


@dataclass(frozen=True, eq=False)
class LoadSnapshot:
    """Load per (layer, expert) at a step: `tokens` is a read-only float64 copy of what was given."""

    step: int
    tokens: np.ndarray

    def __post_init__(self) -> None:
        arr = _as_tokens(self.tokens)
        arr.setflags(write=False)
        object.__setattr__(self, "tokens", arr)
        object.__setattr__(self, "step", int(self.step))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LoadSnapshot):
            return NotImplemented
        return self.step == other.step and np.array_equal(self.tokens, other.tokens)

    def __hash__(self) -> int:
        return hash((self.step, self.tokens.shape, self.tokens.tobytes()))

    @property
    def num_layers(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.tokens.shape[1])

    def actor_loads(self, placement: Placement) -> np.ndarray:
        return actor_loads(self.tokens, placement)

    def imbalance(self, placement: Placement) -> float:
        return imbalance(self.tokens, placement)

    def imbalance_per_layer(self, placement: Placement) -> np.ndarray:
        return imbalance_per_layer(self.tokens, placement)

    def balancedness(self, placement: Placement) -> float:
        return balancedness(self.tokens, placement)

    def balancedness_per_layer(self, placement: Placement) -> np.ndarray:
        return 1.0 / imbalance_per_layer(self.tokens, placement)


class LoadTracker:
    """Exponential moving average of per-step expert token counts.

    ``ema = counts`` on the first update, then ``ema = decay * ema + (1 - decay) * counts``. Every update is
    also recorded (step + raw counts) so a run's load can be saved as JSON lines and replayed exactly.
    """

    def __init__(self, num_layers: int, num_experts: int, decay: float = 0.8, record: bool = True) -> None:
        if num_layers <= 0 or num_experts <= 0:
            raise ValueError(f"num_layers = {num_layers}, num_experts = {num_experts}: both must be > 0")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay = {decay}: must be in [0, 1)")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.decay = float(decay)
        self.record = record
        self._ema = np.zeros((num_layers, num_experts))
        self._step: int | None = None
        self._history: list[tuple[int, np.ndarray]] = []

    @classmethod
    def from_config(cls, cfg: SchedulerConfig, num_layers: int, num_experts: int) -> LoadTracker:
        return cls(num_layers, num_experts, decay=cfg.ema_decay)

    @property
    def last_step(self) -> int | None:
        return self._step

    @property
    def history(self) -> list[tuple[int, np.ndarray]]:
        return list(self._history)

    def update(self, step: int, counts: object) -> None:
        arr = _as_tokens(counts, what="counts")
        if arr.shape != (self.num_layers, self.num_experts):
            raise ValueError(
                f"counts shape {arr.shape}: expected ({self.num_layers}, {self.num_experts}) [layers, experts]"
            )
        step = int(step)
        if self._step is not None and step <= self._step:
            raise ValueError(f"step {step}: must be greater than the last step ({self._step})")
        if self._step is None:
            self._ema = arr.copy()
        else:
            self._ema = self.decay * self._ema + (1.0 - self.decay) * arr
        self._step = step
        if self.record:
            arr.setflags(write=False)
            self._history.append((step, arr))

    def snapshot(self) -> LoadSnapshot:
        if self._step is None:
            raise ValueError("LoadTracker.snapshot(): no update yet")
        return LoadSnapshot(self._step, self._ema)

    def save_jsonl(self, path: str | Path) -> None:
        """One JSON object per recorded step: {"step", "decay", "counts": [[...] per layer]}."""
        if not self.record:
            raise ValueError("LoadTracker was created with record=False: nothing to save")
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:
            for step, counts in self._history:
                f.write(json.dumps({"step": step, "decay": self.decay, "counts": counts.tolist()}) + "\n")
        tmp.replace(path)

    @classmethod
    def load_jsonl(cls, path: str | Path, decay: float | None = None) -> LoadTracker:
        """Replay a file written by save_jsonl. `decay` overrides the recorded one (re-run with another EMA)."""
        path = Path(path)
        tracker: LoadTracker | None = None
        with path.open() as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    step, counts = int(rec["step"]), np.asarray(rec["counts"], dtype=np.float64)
                    rec_decay = float(rec.get("decay", 0.8))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                    raise ValueError(f"{path}:{lineno}: not a load record: {err!r}") from None
                if tracker is None:
                    if counts.ndim != 2:
                        raise ValueError(f"{path}:{lineno}: counts must be [layers, experts]")
                    tracker = cls(counts.shape[0], counts.shape[1], decay if decay is not None else rec_decay)
                try:
                    tracker.update(step, counts)
                except ValueError as err:
                    raise ValueError(f"{path}:{lineno}: {err}") from None
        if tracker is None:
            raise ValueError(f"{path}: no load records")
        return tracker
