"""How the driver names the parties in errors ("router worker 0", "expert actor 2"), aligned with its refs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def names(experts: Sequence[Any], workers: Sequence[Any] = ()) -> list[str]:
    """Names aligned with refs made over `workers` then `experts` (for calls.get_within)."""
    return [f"router worker {i}" for i in range(len(workers))] + [f"expert actor {i}" for i in range(len(experts))]
