"""Queueing primitives of the simulator: FIFO servers as vectorised recursions, and a pool of cores.

A FIFO single server fed jobs (ready r_i, work w_i) in service order ends job i at
``e_i = max(r_i, e_{i-1}) + w_i`` (Lindley). Unrolled: ``e_i = W_i + max_{j<=i} (r_j - W_{j-1})`` with W the
running sum of work, i.e. one cumsum and one running max: many servers (rows) at once, no Python loop.
Absent jobs are ``r = -inf, w = 0``: they never delay anything.

The pool (host tables) is ``cores`` identical servers shared by every process: jobs start in order of ready
time on the first free core (list scheduling); a heap of core free times.
"""

from __future__ import annotations

import heapq

import numpy as np

__all__ = ["CorePool", "batch_ends", "fifo_end", "fifo_makespan"]


def fifo_end(r: np.ndarray, w: np.ndarray, free: np.ndarray | None = None) -> np.ndarray:
    """End times of FIFO servers along the last axis, jobs in the given order.

    r, w: [..., n]; `free` [...]: when each server becomes free (its previous work); absent jobs r = -inf.
    """
    if free is not None:
        r = np.maximum(r, free[..., None])  # -inf jobs become "ready at free" with no work: still harmless
    cw = np.cumsum(w, axis=-1)
    return cw + np.maximum.accumulate(r - (cw - w), axis=-1)


def batch_ends(end: np.ndarray, group_last: np.ndarray) -> np.ndarray:
    """Jobs that became ready together on one server share it fairly and (for equal sizes exactly) end
    together: every job takes the end of the last job of its group. `group_last[i]` = index of the last
    position of i's group along the last axis (the same for every row)."""
    return end[..., group_last]


def tie_groups(sorted_t: np.ndarray) -> np.ndarray | None:
    """For a sorted 1-D array, index of the last element equal to each element; None when all are distinct."""
    n = sorted_t.shape[0]
    same_next = np.zeros(n, dtype=bool)
    same_next[:-1] = sorted_t[1:] == sorted_t[:-1]
    if not same_next.any():
        return None
    idx = np.where(same_next, n, np.arange(n))
    return np.minimum.accumulate(idx[::-1])[::-1]


def fifo_makespan(r: np.ndarray, w: np.ndarray, free: np.ndarray) -> np.ndarray:
    """When each server (row) has done all its jobs, served in order of ready time (-inf = absent)."""
    order = np.argsort(r, axis=-1, kind="stable")
    rs = np.take_along_axis(r, order, axis=-1)
    ws = np.take_along_axis(w, order, axis=-1)
    return fifo_end(rs, ws, free)[..., -1]


class CorePool:
    """`cores` identical servers; jobs start in order of ready time on the earliest free core."""

    def __init__(self, cores: int):
        if cores <= 0:
            raise ValueError(f"cores = {cores}: must be > 0")
        self.cores = cores
        self._free = [0.0] * cores
        self.busy = 0.0

    def run(self, ready: np.ndarray, work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Schedule jobs (flat arrays); returns (start, end). Zero-work jobs end when ready."""
        ready = np.asarray(ready, dtype=np.float64).ravel()
        work = np.asarray(work, dtype=np.float64).ravel()
        start = ready.copy()
        end = ready.copy()
        heap = self._free
        for i in np.argsort(ready, kind="stable").tolist():
            w = work[i]
            if w <= 0:
                continue
            f = heapq.heappop(heap)
            s = max(f, ready[i])
            start[i], end[i] = s, s + w
            heapq.heappush(heap, s + w)
        self.busy += float(work[work > 0].sum())
        return start, end

    @property
    def free_at(self) -> float:
        """When every core is free."""
        return max(self._free)
