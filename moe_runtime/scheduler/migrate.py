"""Apply a placement decision to a running expert fleet (scheduler/fleet.py), between steps.

Order (no expert is ever without a replica, and a replica always arrives with its AdamW state):
  1. copies ("replicate" / "move"): read weights + AdamW state (exp_avg, exp_avg_sq, step) of each copied
     (layer, expert) from its source actor (one batch per source), then load them on each destination (one batch
     per destination: shards it already holds keep their state);
  2. drops (a "move"'s source, "drop"s) on each actor that loses replicas;
  3. every expert actor goes to the new placement version, every router worker gets the new placement, and the
     fleet's placement is the decision's placement.
Must run between steps: grads are zero there, so a copy needs only weights and optimizer state.

The copies and drops applied are the difference between the fleet's placement and the new one
(placement.diff_moves); a decision's `moves` are checked against that difference (a mismatch is an error) and
give each copy's source.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from moe_runtime.placement import Move, Placement, PlacementError, ShardKey, diff_moves
from moe_runtime.scheduler.fleet import ExpertFleet, FleetCallError, ShardState
from moe_runtime.scheduler.types import PlacementDecision

__all__ = ["MigrationError", "MigrationReport", "apply_decision"]

Slot = tuple[int, int, int]  # (layer, expert, actor)


class MigrationError(RuntimeError):
    """A migration step failed; the message names the move(s) involved.

    `consistent`: the fleet was left whole at `version` (rolled back to the old placement, or completed at the
    new one); False: some actors could not be reached to finish either way (`unreachable`) and the fleet must be
    repaired (the Cluster rolls back to its last checkpoint)."""

    def __init__(self, message: str, *, consistent: bool = True, version: int | None = None,
                 unreachable: tuple[int, ...] = ()):  # fmt: skip
        super().__init__(message)
        self.consistent = consistent
        self.version = version
        self.unreachable = unreachable


@dataclass(frozen=True)
class MigrationReport:
    bytes_moved: int  # tensor bytes copied (weights + optimizer state)
    seconds: float
    moves_applied: int  # Move records applied (a "move" is one: its copy and its source's drop)
    new_version: int


def _fmt(m: Move) -> str:
    src = "" if m.src_actor is None else f"actor {m.src_actor} -> "
    return f"{m.kind} (layer {m.layer}, expert {m.expert}) {src}actor {m.dst_actor}"


def _plan(old: Placement, new: Placement, moves: tuple[Move, ...] | None
          ) -> tuple[tuple[Move, ...], dict[Slot, Move], dict[Slot, Move]]:  # fmt: skip
    """(moves, copies {(layer, expert, dst): Move}, drops {(layer, expert, actor): Move}): the given moves
    checked against old -> new, or (None) those of placement.diff_moves."""
    try:
        want = diff_moves(old, new)
    except PlacementError as err:
        raise MigrationError(f"new placement does not fit the fleet's: {err}") from None
    moves = want if moves is None else moves
    want_copies = {(m.layer, m.expert, m.dst_actor) for m in want if m.kind != "drop"}
    want_drops = {(m.layer, m.expert, m.src_actor if m.kind == "move" else m.dst_actor)
                  for m in want if m.kind != "replicate"}  # fmt: skip
    copies: dict[Slot, Move] = {}
    drops: dict[Slot, Move] = {}
    for m in moves:
        if m.kind in ("replicate", "move"):
            if m.src_actor is None or m.src_actor not in old.replicas[m.layer][m.expert]:
                raise MigrationError(
                    f"{_fmt(m)}: the source does not hold the expert in the current placement"
                )
            copies[(m.layer, m.expert, m.dst_actor)] = m
            if m.kind == "move":
                drops[(m.layer, m.expert, m.src_actor)] = m
        elif m.kind == "drop":
            drops[(m.layer, m.expert, m.dst_actor)] = m
        else:
            raise MigrationError(f"move {m}: unknown kind {m.kind!r}")
    if set(copies) != want_copies or set(drops) != want_drops:
        bad = sorted(set(copies) ^ want_copies) + sorted(set(drops) ^ want_drops)
        raise MigrationError(
            f"the decision's moves do not turn placement v{old.version} into v{new.version}: "
            f"(layer, expert, actor) {bad[:5]} differ"
        )
    return moves, copies, drops


def _nbytes(d: ShardState) -> int:
    return sum(t.numel() * t.element_size() for t in d.values() if isinstance(t, torch.Tensor))


def _on(moves: dict[Slot, Move], actor: int | None) -> str:
    """The moves whose slot is on `actor`, formatted."""
    return ", ".join(_fmt(m) for (_layer, _e, a), m in moves.items() if a == actor)


def apply_decision(fleet: ExpertFleet, decision: PlacementDecision | Placement) -> MigrationReport:
    """Move replicas so that `fleet` runs under the decision's placement (see the module docstring).
    A bare Placement is applied with the moves of placement.diff_moves. Raises MigrationError naming the move."""
    t0 = time.perf_counter()
    old = fleet.placement
    if isinstance(decision, PlacementDecision):
        new, given = decision.placement, tuple(decision.moves)
    else:
        new, given = decision, None
    if new.version <= old.version:
        raise MigrationError(
            f"new placement has version {new.version}: must be above the cluster's ({old.version}); the decision "
            "was made for an older placement"
        )
    moves, copies, drops = _plan(old, new, given)

    # 1. copies: read from sources, load on destinations (shards they already host keep their state)
    by_src: dict[int, list[ShardKey]] = defaultdict(list)
    for (layer, e, _dst), m in sorted(copies.items()):
        if (layer, e) not in by_src[m.src_actor]:
            by_src[m.src_actor].append((layer, e))
    try:
        got = fleet.read_shards(by_src)
    except FleetCallError as err:
        names = ", ".join(_fmt(m) for m in copies.values() if m.src_actor == err.actor)
        raise MigrationError(f"reading state from actor {err.actor} failed for {names}: {err}") from err
    by_dst: dict[int, dict[ShardKey, ShardState]] = defaultdict(dict)
    moved = 0
    for (layer, e, dst), m in sorted(copies.items()):
        d = got[m.src_actor][(layer, e)]
        by_dst[dst][(layer, e)] = d
        moved += _nbytes(d)
    try:
        hosted = fleet.load_shards(by_dst, new.version)
    except FleetCallError as err:
        _fail(fleet, old, by_dst, f"loading on actor {err.actor} failed for {_on(copies, err.actor)}: {err}", err)
    for dst, shards in by_dst.items():
        missing = set(shards) - hosted[dst]
        if missing:
            _fail(fleet, old, by_dst, f"actor {dst} does not host {sorted(missing)} after loading them", None)

    # 2. drops, only once every copy is in place; from here on the migration is completed, not rolled back
    by_actor: dict[int, list[ShardKey]] = defaultdict(list)
    for layer, e, a in sorted(drops):
        by_actor[a].append((layer, e))
    try:
        fleet.drop_shards(by_actor)
    except FleetCallError as err:
        _complete(fleet, new, by_actor, f"dropping on actor {err.actor} failed for {_on(drops, err.actor)}: {err}",
                  err)

    # 3. new version everywhere; router workers switch to the new placement
    try:
        fleet.switch_placement(new)
    except FleetCallError as err:
        raise MigrationError(f"switching to placement version {new.version} failed: {err}; the actors hold the "
                             f"shards of version {new.version} but not every party switched",
                             consistent=False, version=None) from err
    return MigrationReport(moved, time.perf_counter() - t0, len(moves), new.version)


def _each_drop(fleet: ExpertFleet, batches: dict[int, list[ShardKey]]) -> list[int]:
    """Drop actor by actor; the actors whose drop failed. "Not hosted" (a KeyError, e.g. a copy that never
    arrived) is nothing left to drop, not a failure."""
    failed = []
    for a, batch in batches.items():
        try:
            fleet.drop_shards({a: batch})
        except KeyError:
            pass
        except FleetCallError as err:
            if not isinstance(err.cause, KeyError):
                failed.append(a)
    return failed


def _fail(fleet: ExpertFleet, old: Placement, loaded: dict[int, dict[ShardKey, ShardState]], why: str,
          cause: BaseException | None) -> None:  # fmt: skip
    """A copy failed before anything was dropped: roll back to `old` (drop every copy that arrived, every party
    back at the old version), then raise. Nothing of the old placement was removed, so the rollback needs no
    state from the failed actor."""
    failed_actor = getattr(cause, "actor", None)  # its load did not complete: nothing of it to drop
    unreachable = set(_each_drop(fleet, {a: sorted(ks) for a, ks in loaded.items() if a != failed_actor}))
    try:
        fleet.switch_placement(old)  # a dead actor fails this: the fleet then needs repair
    except FleetCallError as err:
        unreachable.add(err.actor if err.actor is not None else (-1 if failed_actor is None else failed_actor))
    bad = tuple(sorted(a for a in unreachable if a >= 0))
    consistent = not unreachable
    raise MigrationError(
        f"{why}; rolled back to placement version {old.version}"
        + ("" if consistent else f" except on actors {list(bad) or 'unknown'} (unreachable: repair needed)"),
        consistent=consistent, version=old.version, unreachable=bad,
    ) from cause


def _complete(fleet: ExpertFleet, new: Placement, drops: dict[int, list[ShardKey]], why: str,
              cause: FleetCallError) -> None:
    """A drop failed once every copy was in place: finish the migration on every actor that answers (retry the
    drops one actor at a time, switch to `new`), then raise saying whether the fleet is whole."""
    unreachable = set(_each_drop(fleet, drops))
    if not unreachable:
        try:
            fleet.switch_placement(new)
        except FleetCallError as err:
            unreachable.add(err.actor if err.actor is not None else -1)
    bad = tuple(sorted(a for a in unreachable if a >= 0))
    consistent = not unreachable
    raise MigrationError(
        f"{why}; " + (f"completed at placement version {new.version} on retry" if consistent
                      else f"actors {list(bad) or 'unknown'} unreachable: repair needed"),
        consistent=consistent, version=new.version if consistent else None, unreachable=bad,
    ) from cause
