"""Bounded control-plane calls: every Ray call the driver makes waits at most a named timeout."""

from __future__ import annotations

from typing import Any

from moe_runtime.config import RuntimeConfig

CONTROL_TIMEOUT_S = 120.0  # any control-plane call (load, save, optimizer step, ...)
START_TIMEOUT_S = 180.0  # actors up and placement group ready
COLLECTIVE_TIMEOUT_S = 60.0
FREE_WAIT_S = 10.0  # how long shutdown waits for Ray to take its placement group back


def step_timeout(cfg: RuntimeConfig) -> float:
    # every MoE layer does one forward and one backward exchange per micro-batch, each bounded by the deadline
    return CONTROL_TIMEOUT_S + 2 * cfg.model.num_layers * cfg.train.micro_batches * cfg.transport.deadline_s


def get_within(refs: Any, timeout: float, what: str) -> Any:
    """ray.get with a bound; a timeout names what was waited for."""
    import ray

    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError as err:
        raise ray.exceptions.GetTimeoutError(f"{what}: no answer within {timeout:.0f} s") from err
