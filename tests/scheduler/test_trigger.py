"""The rebalance trigger: a pure function of a load snapshot, the placement and its parameters."""

from __future__ import annotations

import pytest

from moe_runtime.config import SchedulerConfig
from moe_runtime.placement import Placement
from moe_runtime.scheduler.load import LoadSnapshot
from moe_runtime.scheduler.trigger import TriggerParams, should_rebalance

PLACEMENT = Placement.contiguous(1, 4, 2)  # experts 0, 1 on actor 0; 2, 3 on actor 1
SKEWED = [[30.0, 10.0, 5.0, 5.0]]  # actor loads 40 / 10: imbalance 40 / 25 = 1.6
EVEN = [[10.0, 10.0, 10.0, 10.0]]


def test_fires_on_the_every_steps_boundary_above_the_threshold():
    params = TriggerParams(enabled=True, every_steps=5, imbalance_threshold=1.5)
    fired = [s for s in range(20) if should_rebalance(LoadSnapshot(s, SKEWED), PLACEMENT, params).rebalance]
    assert fired == [4, 9, 14, 19]
    d = should_rebalance(LoadSnapshot(4, SKEWED), PLACEMENT, params)
    assert d.imbalance == pytest.approx(1.6) and "> threshold" in d.reason
    off = should_rebalance(LoadSnapshot(3, SKEWED), PLACEMENT, params)
    assert not off.rebalance and off.imbalance is None  # between boundaries the load is not even looked at


def test_stays_quiet_when_balanced_or_disabled():
    params = TriggerParams(enabled=True, every_steps=1, imbalance_threshold=1.5)
    d = should_rebalance(LoadSnapshot(0, EVEN), PLACEMENT, params)
    assert not d.rebalance and d.imbalance == pytest.approx(1.0)
    assert not should_rebalance(LoadSnapshot(0, SKEWED), PLACEMENT, TriggerParams(enabled=False, every_steps=1, imbalance_threshold=1.0)).rebalance
    # at exactly the threshold: no (strictly above fires)
    at = TriggerParams(enabled=True, every_steps=1, imbalance_threshold=1.6)
    assert not should_rebalance(LoadSnapshot(0, SKEWED), PLACEMENT, at).rebalance


def test_params_from_config_and_validation():
    p = TriggerParams.from_config(SchedulerConfig(enabled=True, every_steps=3, imbalance_threshold=1.2))
    assert p == TriggerParams(True, 3, 1.2)
    with pytest.raises(ValueError, match="every_steps"):
        TriggerParams(every_steps=0)
    with pytest.raises(ValueError, match="imbalance_threshold"):
        TriggerParams(imbalance_threshold=0.5)
