"""A migration that fails part-way is rolled back (a copy failed: nothing was dropped yet) or completed (a drop
failed: every copy is in place), never left half-migrated; when an actor cannot be reached either way the error
says so (consistent = False) and names it. Runs on the in-memory fleet."""

from __future__ import annotations

import pytest

from moe_runtime.placement import Placement
from moe_runtime.scheduler.fleet import FleetCallError
from moe_runtime.scheduler.migrate import MigrationError, apply_decision
from tests.scheduler.fakes import FakeFleet
from tests.scheduler.test_migrate import BASE, _check_serves, _with

NEW = _with(BASE, {(0, 0): (0, 1), (1, 2): (0,)})  # replicate (0, 0) onto actor 1; move (1, 2) from 1 to 0


class FlakyFleet(FakeFleet):
    """Fails an operation on an actor the first `times` times it is asked (a transient error), or always."""

    def __init__(self, placement: Placement, op: str, actor: int | None, times: int = 1 << 30):
        super().__init__(placement)
        self.op, self.actor, self.left = op, actor, times

    def _call(self, op: str, actor: int | None) -> None:
        self.calls.append((op, actor))
        if (op, actor) == (self.op, self.actor) and self.left > 0:
            self.left -= 1
            raise FleetCallError(actor, RuntimeError(f"{op} failed on actor {actor}"))


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failed_copy_is_rolled_back_to_the_old_placement(failing):
    fleet = FlakyFleet(BASE, "load", failing, times=1)
    with pytest.raises(MigrationError, match="rolled back to placement version 0") as info:
        apply_decision(fleet, NEW)
    assert info.value.consistent and info.value.version == 0
    _check_serves(fleet, BASE)  # every actor at version 0 with exactly its old shards; workers on BASE


def test_a_failed_drop_is_completed_on_retry():
    fleet = FlakyFleet(BASE, "drop", 1, times=1)
    with pytest.raises(MigrationError, match="completed at placement version 1") as info:
        apply_decision(fleet, NEW)
    assert info.value.consistent and info.value.version == 1
    _check_serves(fleet, NEW)


def test_an_unreachable_actor_is_named_and_the_fleet_marked_for_repair():
    fleet = FlakyFleet(BASE, "drop", 1)  # actor 1 never answers a drop again (it died)
    with pytest.raises(MigrationError, match=r"actors \[1\] unreachable: repair needed") as info:
        apply_decision(fleet, NEW)
    assert not info.value.consistent and info.value.unreachable == (1,)
    assert fleet.placement is BASE  # the placement changes only when every party switched


def test_a_dead_destination_rolls_back_the_others_and_is_named():
    fleet = FlakyFleet(BASE, "load", 1)

    def switch(placement):  # the dead actor fails the switch back too
        raise FleetCallError(1, RuntimeError("actor 1 died"))

    fleet.switch_placement = switch
    with pytest.raises(MigrationError, match=r"except on actors \[1\]") as info:
        apply_decision(fleet, NEW)
    assert not info.value.consistent and info.value.unreachable == (1,)
    assert sorted(fleet.shards[0]) == BASE.shards_of(0)  # actor 0's new copy was dropped again
