"""Queueing primitives of the simulator: FIFO servers as vectorised recursions, and a pool of cores.

A FIFO single server fed jobs (ready r_i, work w_i) in service order ends job i at
``e_i = max(r_i, e_{i-1}) + w_i`` (Lindley). Unrolled: ``e_i = W_i + max_{j<=i} (r_j - W_{j-1})`` with W the
running sum of work, i.e. one cumsum and one running max: many servers (rows) at once, no Python loop.
Absent jobs are ``r = -inf, w = 0``: they never delay anything.

The pool (host tables) is ``cores`` of CPU capacity shared by every process (``CorePool``): jobs are placed in
order of ready time on a piecewise-constant usage profile.
"""

from __future__ import annotations

import bisect
import math

import numpy as np

__all__ = ["CorePool", "fifo_end", "members", "row_ties", "small_fifo", "tie_groups"]

_NEG32 = np.float32(-np.inf)  # absent job in the engine's float32 [actors, workers] matrices


def fifo_end(r: np.ndarray, w: np.ndarray, free: np.ndarray | None = None) -> np.ndarray:
    """End times of FIFO servers along the last axis, jobs in the given order.

    r, w: [..., n]; `free` [...]: when each server becomes free (its previous work); absent jobs r = -inf.
    """
    if free is not None:
        r = np.maximum(r, free[..., None])  # -inf jobs become "ready at free" with no work: still harmless
    cw = np.cumsum(w, axis=-1)
    return cw + np.maximum.accumulate(r - (cw - w), axis=-1)


def tie_groups(sorted_t: np.ndarray) -> np.ndarray | None:
    """For a sorted 1-D array, index of the last element equal to each element; None when all are distinct."""
    n = sorted_t.shape[0]
    same_next = np.zeros(n, dtype=bool)
    same_next[:-1] = sorted_t[1:] == sorted_t[:-1]
    if not same_next.any():
        return None
    idx = np.where(same_next, n, np.arange(n))
    return np.minimum.accumulate(idx[::-1])[::-1]


def row_ties(rs: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Rows of jobs sorted by ready time: jobs ready at the same time form a batch that shares the server and
    ends together (at the end of the batch's last job)."""
    n = end.shape[1]
    if n < 2:
        return end
    same = np.zeros(end.shape, dtype=bool)
    same[:, :-1] = (rs[:, 1:] == rs[:, :-1]) & np.isfinite(rs[:, 1:])
    if not same.any():
        return end
    last = np.minimum.accumulate(np.where(same, n, np.arange(n))[:, ::-1], axis=1)[:, ::-1]
    return np.take_along_axis(end, last, axis=1)


def members(is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column indices of the True entries of each row, padded: (idx [rows, m], valid [rows, m])."""
    m = max(1, int(is_member.sum(axis=1).max()))
    order = np.argsort(~is_member, axis=1, kind="stable")[:, :m]
    valid = np.take_along_axis(is_member, order, axis=1)
    return np.where(valid, order, 0), valid


def small_fifo(r: np.ndarray, w: np.ndarray, member: np.ndarray, idx: np.ndarray, free: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """FIFO per row on compact float32 arrays (from ``members``): sort by r, solve; jobs ready together end
    together (a fair-shared batch). Returns (end, column index, member), all in the sorted order."""
    r = np.where(member, r, _NEG32)
    o = np.argsort(r, axis=1, kind="stable")
    rs = np.take_along_axis(r, o, axis=1)
    ws = np.where(np.take_along_axis(member, o, axis=1), np.take_along_axis(w, o, axis=1), np.float32(0))
    end = row_ties(rs, fifo_end(rs, ws, free))
    return end, np.take_along_axis(idx, o, axis=1), np.take_along_axis(member, o, axis=1)


class CorePool:
    """A pool of `cores` (possibly fractional) CPU capacity shared by every process of a host.

    Jobs are placed in order of ready time; each runs at rate ``min(1, cores - usage(t))``, where usage is the
    rate already given to earlier-placed jobs (a job never runs faster than one core, and never slows a job
    placed before it). With integer cores this is list scheduling that may fill idle gaps; with fractional
    cores (the share of a busy shared machine left to us) a lone job still runs at full speed when at least one
    core is free. The usage profile is a piecewise-constant function kept as breakpoints.
    """

    def __init__(self, cores: float):
        if not cores > 0:
            raise ValueError(f"cores = {cores}: must be > 0")
        self.cores = float(cores)
        self._t = [0.0]  # breakpoints; usage self._u[i] on [t[i], t[i+1]), the last one up to infinity
        self._u = [0.0]
        self.busy = 0.0

    def _split(self, t: float) -> int:
        """Index of the segment starting at t (a breakpoint is inserted if needed)."""
        i = bisect.bisect_right(self._t, t) - 1
        if self._t[i] != t:
            self._t.insert(i + 1, t)
            self._u.insert(i + 1, self._u[i])
            i += 1
        return i

    def _place(self, r: float, w: float) -> tuple[float, float]:
        i = self._split(max(r, 0.0))
        start = None
        cap = self.cores
        while True:
            rate = min(1.0, cap - self._u[i])
            t0 = self._t[i]
            t1 = self._t[i + 1] if i + 1 < len(self._t) else math.inf
            if rate > 1e-12:
                if start is None:
                    start = t0
                if rate * (t1 - t0) >= w * (1 - 1e-12):  # ends in this segment (rounding tolerance)
                    end = min(t0 + w / rate, t1)
                    if end <= t0:  # nothing left to run
                        return start, t0
                    if end < t1:
                        self._split(end)
                    self._u[i] += rate
                    return start, end
                w -= rate * (t1 - t0)
                self._u[i] += rate
            i += 1

    def run(self, ready: np.ndarray, work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Place jobs (flat arrays) in order of ready time; returns (start, end). Zero-work jobs end when ready."""
        ready = np.asarray(ready, dtype=np.float64).ravel()
        work = np.asarray(work, dtype=np.float64).ravel()
        start = ready.copy()
        end = ready.copy()
        for i in np.argsort(ready, kind="stable").tolist():
            if work[i] > 0:
                start[i], end[i] = self._place(float(ready[i]), float(work[i]))
        self.busy += float(work[work > 0].sum())
        return start, end

    @property
    def free_at(self) -> float:
        """When the last placed job ends (0 when nothing was placed)."""
        busy = [i for i, u in enumerate(self._u) if u > 1e-12]
        return self._t[busy[-1] + 1] if busy else 0.0
