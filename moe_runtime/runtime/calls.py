"""Bounded control-plane calls: every Ray call the driver makes waits at most a named timeout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moe_runtime.config import RuntimeConfig

CONTROL_TIMEOUT_S = 120.0  # any control-plane call (load, save, optimizer step, ...)
START_TIMEOUT_S = 180.0  # actors up and placement group ready
COLLECTIVE_TIMEOUT_S = 60.0
FREE_WAIT_S = 10.0  # how long shutdown waits for Ray to take its placement group back


def control_timeout(cfg: RuntimeConfig) -> float:
    """How long a control-plane call may take before its party counts as hung (cluster.hang_timeout_s)."""
    return cfg.cluster.hang_timeout_s


def step_timeout(cfg: RuntimeConfig) -> float:
    # every MoE layer does one forward and one backward exchange per micro-batch, each bounded by the deadline
    return control_timeout(cfg) + 2 * cfg.model.num_layers * cfg.train.micro_batches * cfg.transport.deadline_s


def get_within(refs: Any, timeout: float, what: str, names: Sequence[str] | None = None) -> Any:
    """ray.get with a bound; a timeout names what was waited for and, given `names` (one per ref), who did not
    answer."""
    import ray

    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError as err:
        who = ""
        if isinstance(refs, list) and refs:
            _, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
            waiting = {r.hex() for r in pending}
            late = [names[i] if names else f"call {i}" for i, r in enumerate(refs) if r.hex() in waiting]
            who = f" from {', '.join(late)}" if late else ""
        raise ray.exceptions.GetTimeoutError(f"{what}: no answer within {timeout:.3g} s{who}") from err
