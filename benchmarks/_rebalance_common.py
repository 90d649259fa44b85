"""Pieces shared by the rebalance_* benchmarks (our policy `decide` against DeepSeek EPLB).

The policy parameters under test, how two plans' costs are reported (copies, bytes), the timer, the ratio
rule and the argument every part takes. Copies between two plans: `moe_runtime.placement.copies_between`.
Not a benchmark itself.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from benchmarks._common import make_parser, stderr_console
from moe_runtime.placement import Placement
from moe_runtime.scheduler.policy import PolicyParams

# The SchedulerConfig defaults without a byte budget (EPLB has none either).
PARAMS = PolicyParams(min_gain=0.05, byte_budget=None, min_gain_per_copy=0.01)
REDUNDANT_SLOTS = 1  # slots per GPU per layer beyond ceil(experts / GPUs)

T = TypeVar("T")


@dataclass
class ScriptRun:
    """What every rebalance script does around its experiment: parse arguments, log to stderr, clock it."""

    args: argparse.Namespace
    console: Any
    t0: float = field(default_factory=time.perf_counter)
    load0: float = field(default_factory=lambda: os.getloadavg()[0])

    @classmethod
    def start(
        cls,
        name: str,
        description: str,
        add_args: Sequence[Callable[[argparse.ArgumentParser], None]],
        argv: list[str] | None,
    ) -> ScriptRun:
        """make_parser(...) plus --seed (every part takes it) and each of `add_args`, parsed from `argv`."""
        p = make_parser(name, description)
        p.add_argument("--seed", type=int, default=0)
        for add in add_args:
            add(p)
        return cls(p.parse_args(argv), stderr_console(width=None if sys.stderr.isatty() else 160))

    def clock(self) -> dict[str, Any]:
        """The 1-minute load average at the start and now, and the seconds since the start."""
        return {"loadavg_1m": [self.load0, os.getloadavg()[0]], "seconds": time.perf_counter() - self.t0}


def policy_params_json(params: PolicyParams = PARAMS) -> dict[str, Any]:
    return {"min_gain": params.min_gain, "byte_budget": params.byte_budget,
            "min_gain_per_copy": params.min_gain_per_copy}  # fmt: skip


def slots_for(experts: int, gpus: int, redundant: int = REDUNDANT_SLOTS) -> int:
    return math.ceil(experts / gpus) + redundant


def total_replicas(p: Placement) -> int:
    return sum(len(a) for row in p.replicas for a in row)


def copies_and_bytes(ours: int, eplb_aligned: int, eplb_raw: int, bytes_per_expert: int) -> dict[str, int]:
    """Expert copies of each plan and the bytes they move (weights + AdamW state per copy)."""
    return {
        "copies_ours": ours,
        "copies_eplb_aligned": eplb_aligned,
        "copies_eplb_raw": eplb_raw,
        "bytes_ours": ours * bytes_per_expert,
        "bytes_eplb_aligned": eplb_aligned * bytes_per_expert,
        "bytes_eplb_raw": eplb_raw * bytes_per_expert,
    }


def timed(fn: Callable[..., T], *args: Any) -> tuple[T, float, float]:
    """fn(*args), its wall seconds and its CPU seconds (this process)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - w0, time.process_time() - c0


def ratio(a: float, b: float) -> float | None:
    if b > 0:
        return a / b
    return 1.0 if a == 0 else None  # 0 / 0: both moved nothing


def mean_or_none(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)
