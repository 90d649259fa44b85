"""attribute_timings: where a step's time went, from what the parties reported (pure; no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from moe_runtime.records import ActorStepStats, TimingMeans, WorkerPass
from moe_runtime.runtime.step import PhaseTimes, attribute_timings


def _pass(wall: float, moe: float, router: float, disp: float, disp_bwd: float) -> WorkerPass:
    z = np.zeros((1, 2), dtype=np.int64)
    return WorkerPass(lm=1.0, aux=0.0, load_le=z, chunk_loads_le=(z,), wall_s=wall, main_cpu_s=wall / 2,
                      process_cpu_s=wall, moe_s=moe, router_s=router, dispatch_s=disp, dispatch_bwd_s=disp_bwd)


def test_attribution_by_hand() -> None:
    passes = [_pass(1.0, 0.6, 0.1, 0.3, 0.2), _pass(0.8, 0.4, 0.1, 0.1, 0.2)]
    actors = [ActorStepStats(0.05, 0.04, expert_compute_s=0.2, expert_compute_cpu_s=0.15),
              ActorStepStats(0.07, 0.06, expert_compute_s=0.3, expert_compute_cpu_s=0.25)]
    t = attribute_timings(PhaseTimes(10.0, 11.2, 11.5, 11.6, 0.0), passes, actors, [0.1, 0.2], 2.0, 0.5)
    # means over workers: wall 0.9, moe 0.5, router 0.1, dispatch 0.2, dispatch_bwd 0.2
    assert t.step_s == pytest.approx(1.6)
    assert t.forward_backward_s == pytest.approx(1.2)
    assert t.control_s == pytest.approx(0.2)  # 1.2 - slowest worker (1.0)
    assert t.expert_s == pytest.approx(0.3)  # slowest actor
    assert t.expert_cpu_s == pytest.approx(0.5)
    assert t.combine_s == pytest.approx(0.2)  # moe - router - dispatch
    assert t.dispatch_s == pytest.approx(0.1)  # (0.2 + 0.2) - 0.3
    assert t.router_s == pytest.approx(0.3)  # 0.9 - 0.4 - 0.2
    assert t.grad_sync_s == pytest.approx(0.15)
    assert t.optimizer_s == pytest.approx(0.1 + 0.15)  # phase C + phase B beyond the sync
    assert t.expert_optimizer_cpu_s == pytest.approx(0.10)
    assert t.worker_cpu_s == pytest.approx(1.8)
    assert (t.grad_norm, t.clip_coef) == (2.0, 0.5)


def test_timing_means_average_every_field() -> None:
    passes = [_pass(1.0, 0.6, 0.1, 0.3, 0.2)]
    a = attribute_timings(PhaseTimes(0.0, 1.0, 1.0, 2.0, 0.0), passes, [], [0.0], 1.0, 1.0)
    b = attribute_timings(PhaseTimes(0.0, 1.0, 1.0, 4.0, 0.0), passes, [], [0.0], 3.0, 1.0)
    m = TimingMeans()
    m.add(a)
    m.add(b)
    means = m.means()
    assert set(means) == set(a.as_dict())
    assert means["step_s"] == pytest.approx(3.0) and means["grad_norm"] == pytest.approx(2.0)
