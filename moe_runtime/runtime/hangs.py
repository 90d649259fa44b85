"""Hangs in the data plane: a party that stops mid-step while its peers finish.

The router workers of a training step do the same work (equal chunks of the batch through the same expert actors),
so once one has finished its forward/backward the others are due soon after. `get_with_peers` waits for a list of
such calls: the overall bound stays (calls.step_timeout), but once the first call is done, the rest must finish
within `straggler_s` (cluster.hang_timeout_s), else a GetTimeoutError names the ones that did not: hung, e.g. a
stopped process mid-exchange. A worker that waits on a hung *expert actor* is not blamed: every worker calls every
actor, so all of them wait, and the data-plane deadline (transport.deadline_s, shorter than hang_timeout_s) fails
their exchange with an error naming the actor's server. Recovery then pings, kills the hung party (after one
short ping: runtime/hung_parties.py) and re-runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from moe_runtime.runtime.hung_parties import HUNG_ATTR

log = logging.getLogger(__name__)

__all__ = ["get_with_peers"]


def get_with_peers(refs: Sequence[Any], timeout_s: float, straggler_s: float, what: str,
                   names: Sequence[str]) -> list[Any]:  # fmt: skip
    """ray.get of `refs` within `timeout_s`, and within `straggler_s` of the first one that finished; an error
    of a finished call is raised as soon as it is seen. A timeout names the calls still running."""
    import ray

    refs = list(refs)
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    first_done: float | None = None
    pending = list(range(len(refs)))
    while pending:
        now = time.monotonic()
        limit = deadline if first_done is None else min(deadline, first_done + straggler_s)
        if now >= limit:
            late = ", ".join(names[i] for i in pending)
            straggling = first_done is not None and limit < deadline
            why = (f"{late} did not finish within {straggler_s:.3g} s of the first (hung)" if straggling
                   else f"no answer within {timeout_s:.3g} s from {late}")  # fmt: skip
            log.warning("%s: %s", what, why)
            err = ray.exceptions.GetTimeoutError(f"{what}: {why}")
            if straggling:  # their peers did the same work in time: recovery kills them after one short ping
                setattr(err, HUNG_ATTR, tuple(names[i] for i in pending))
            raise err
        ready, _ = ray.wait([refs[i] for i in pending], num_returns=1, timeout=min(0.5, limit - now))
        if not ready:
            continue
        done = {r.hex() for r in ready}
        for i in [i for i in pending if refs[i].hex() in done]:
            ray.get(refs[i])  # raises a failed call's error now
            pending.remove(i)
            first_done = first_done if first_done is not None else time.monotonic()
    return ray.get(refs)
