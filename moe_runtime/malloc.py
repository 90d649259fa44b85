"""Process-level allocator tuning for the processes that carry the data plane (and the calibration that times them).

Bottom layer (ctypes only): the expert server, the client and the simulator's host calibration all call it, and
the calibration must not import the transport to get the same allocator the runtime runs with.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["tune_malloc"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_malloc_tuned: bool | None = None


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Keep multi-MB message buffers in the heap instead of mmap/munmap-ing them on every call (glibc only).

    Every Dispatch allocates a handful of MB-sized buffers (frames, envelopes, gRPC's copies, outputs). With glibc's
    defaults they are mmap-ed fresh or trimmed back to the OS after the call, and the next call pays a page fault
    per 4 KiB to get them back. Fixing the mmap threshold at 32 MB (glibc's maximum) and raising the trim threshold
    keeps them resident and reused (about 2x on a 4 MB batch: see docs/measurements.md). Process-wide and
    idempotent; called by ExpertServer.start() and ExpertClient (the processes that carry the data plane); returns
    whether it applied.
    """
    global _malloc_tuned
    if _malloc_tuned is None:
        _malloc_tuned = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
                if hasattr(libc, "gnu_get_libc_version"):  # glibc, not musl
                    _malloc_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
                        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))  # fmt: skip
            except (OSError, AttributeError):
                pass
    return _malloc_tuned
