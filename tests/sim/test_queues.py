"""Queue primitives against brute force: the vectorised FIFO recursion and the pool of shared cores."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from moe_runtime.sim.queues import CorePool, fifo_end


def test_fifo_end_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    r = rng.random((5, 40))
    r[rng.random((5, 40)) < 0.3] = -np.inf  # absent jobs
    w = np.where(np.isfinite(r), rng.random((5, 40)) * 0.1, 0.0)
    free = rng.random(5) * 0.5
    got = fifo_end(r, w, free)
    for i in range(5):
        t = free[i]
        for j in range(40):
            t = max(t, r[i, j]) + w[i, j]
            assert got[i, j] == pytest.approx(t)


def test_core_pool():
    # one core: FIFO in order of ready time
    rng = np.random.default_rng(1)
    ready, work = rng.random(30), rng.random(30) * 0.1
    start, end = CorePool(1).run(ready, work)
    t = 0.0
    for i in np.argsort(ready, kind="stable"):
        t = max(t, ready[i]) + work[i]
        assert end[i] == pytest.approx(t)
    # integer cores, jobs ready in order: list scheduling on the earliest free core
    start, end = CorePool(3).run(np.arange(10) * 0.01, np.full(10, 1.0))
    cores = [0.0, 0.0, 0.0]
    for i in range(10):
        f = heapq.heappop(cores)
        s = max(f, i * 0.01)
        assert start[i] == pytest.approx(s) and end[i] == pytest.approx(s + 1.0)
        heapq.heappush(cores, s + 1.0)
    # fractional capacity: a lone job at full speed up to one core; the second gets what is left
    assert CorePool(0.5).run([0.0], [1.0])[1][0] == pytest.approx(2.0)
    _, end = CorePool(1.5).run([0.0, 0.0], [2.0, 2.0])
    assert end.tolist() == pytest.approx([2.0, 3.0])
    pool = CorePool(1.25)
    _, end = pool.run(ready, work)
    assert pool.free_at == pytest.approx(end.max())
    assert end.max() >= ready.min() + work.sum() / 1.25 - 1e-12  # capacity bound
