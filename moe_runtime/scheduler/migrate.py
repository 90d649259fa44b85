"""Apply a placement decision to a running cluster, between steps.

Order (no expert is ever without a replica, and a replica always arrives with its AdamW state):
  1. copies ("replicate" / "move"): read weights + AdamW state (exp_avg, exp_avg_sq, step) of each copied
     (layer, expert) from its source actor (one `state` call per source), then load them on each destination
     (one `load_shards(..., replace=False)` call per destination: shards it already holds keep their state);
  2. drops (a "move"'s source, "drop"s): `drop_shards` on each actor that loses replicas;
  3. every expert actor goes to the new placement version, every router worker gets the new placement
     (`set_placement`), and `cluster.placement` is the decision's placement.
Must run between steps: grads are zero there, so a copy needs only weights and optimizer state.

The copies and drops applied are the difference between the cluster's placement and the new one; a
decision's `moves` are checked against that difference (a mismatch is an error) and give each copy's source.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from moe_runtime.placement import Placement
from moe_runtime.scheduler.policy import Move, PlacementDecision

__all__ = ["MigrationError", "MigrationReport", "apply_decision", "moves_between"]

MIGRATE_TIMEOUT_S = 120.0


class MigrationError(RuntimeError):
    """A migration step failed; the message names the move(s) involved."""


@dataclass(frozen=True)
class MigrationReport:
    bytes_moved: int  # tensor bytes copied (weights + optimizer state)
    seconds: float
    moves_applied: int  # Move records applied (a "move" is one: its copy and its source's drop)
    new_version: int


def _fmt(m: Move) -> str:
    src = "" if m.src_actor is None else f"actor {m.src_actor} -> "
    return f"{m.kind} (layer {m.layer}, expert {m.expert}) {src}actor {m.dst_actor}"


def moves_between(old: Placement, new: Placement) -> tuple[Move, ...]:
    """Moves that turn `old` into `new`: a copy of each new replica (source = the expert's first old holder;
    "move" when an old holder is dropped, paired in order, else "replicate") and a "drop" for the rest."""
    _check_shape(old, new)
    out: list[Move] = []
    for layer, (orow, nrow) in enumerate(zip(old.replicas, new.replicas)):
        for e, (oa, na) in enumerate(zip(orow, nrow)):
            added = [a for a in na if a not in oa]
            removed = [a for a in oa if a not in na]
            for i, dst in enumerate(added):
                if i < len(removed):
                    out.append(Move(layer, e, removed[i], dst, "move"))
                else:
                    out.append(Move(layer, e, oa[0], dst, "replicate"))
            for a in removed[len(added) :]:
                out.append(Move(layer, e, None, a, "drop"))
    return tuple(out)


def _check_shape(old: Placement, new: Placement) -> None:
    if (old.num_actors, old.num_layers, old.num_experts) != (new.num_actors, new.num_layers, new.num_experts):
        raise MigrationError(
            f"new placement is {new.num_layers}x{new.num_experts} on {new.num_actors} actors: the cluster's is "
            f"{old.num_layers}x{old.num_experts} on {old.num_actors}"
        )


def _plan(old: Placement, new: Placement, moves: tuple[Move, ...]):
    """(copies {(layer, expert, dst): Move}, drops {(layer, expert, actor): Move}) checked against old -> new."""
    _check_shape(old, new)
    want_copies = {(l, e, a) for l, row in enumerate(new.replicas) for e, na in enumerate(row) for a in na
                   if a not in old.replicas[l][e]}  # fmt: skip
    want_drops = {(l, e, a) for l, row in enumerate(old.replicas) for e, oa in enumerate(row) for a in oa
                  if a not in new.replicas[l][e]}  # fmt: skip
    copies: dict[tuple[int, int, int], Move] = {}
    drops: dict[tuple[int, int, int], Move] = {}
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
    return copies, drops


def _nbytes(d: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in d.values() if isinstance(t, torch.Tensor))


def apply_decision(cluster: Any, decision: PlacementDecision | Placement) -> MigrationReport:
    """Move replicas so that `cluster` runs under the decision's placement (see the module docstring).
    A bare Placement is applied with the moves of `moves_between`. Raises MigrationError naming the move."""
    import ray

    t0 = time.perf_counter()
    old: Placement = cluster.placement
    if isinstance(decision, PlacementDecision):
        new, moves = decision.placement, tuple(decision.moves)
    else:
        new = decision
        moves = moves_between(old, new)
    if new.version <= old.version:
        raise MigrationError(
            f"new placement has version {new.version}: must be above the cluster's ({old.version}); the decision "
            "was made for an older placement"
        )
    copies, drops = _plan(old, new, moves)

    # 1. copies: read from sources, load on destinations (replace=False keeps what they already host)
    by_src: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for (layer, e, _dst), m in sorted(copies.items()):
        if (layer, e) not in by_src[m.src_actor]:
            by_src[m.src_actor].append((layer, e))
    states: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {}  # (src, layer, expert) -> state
    src_refs = {src: cluster.experts[src].state.remote(keys) for src, keys in by_src.items()}
    for src, ref in src_refs.items():
        try:
            got = ray.get(ref, timeout=MIGRATE_TIMEOUT_S)
        except Exception as err:
            names = ", ".join(_fmt(m) for m in copies.values() if m.src_actor == src)
            raise MigrationError(f"reading state from actor {src} failed for {names}: {err}") from err
        for (layer, e), d in got.items():
            states[(src, int(layer), int(e))] = d
    by_dst: dict[int, dict[tuple[int, int], dict[str, torch.Tensor]]] = defaultdict(dict)
    moved = 0
    for (layer, e, dst), m in sorted(copies.items()):
        d = states[(m.src_actor, layer, e)]
        by_dst[dst][(layer, e)] = d
        moved += _nbytes(d)
    dst_refs = {dst: cluster.experts[dst].load_shards.remote(shards, new.version, replace=False)
                for dst, shards in by_dst.items()}  # fmt: skip
    for dst, ref in dst_refs.items():
        try:
            hosted = set(map(tuple, ray.get(ref, timeout=MIGRATE_TIMEOUT_S)))
        except Exception as err:
            names = ", ".join(_fmt(m) for (_l, _e, d), m in copies.items() if d == dst)
            raise MigrationError(f"loading on actor {dst} failed for {names}: {err}") from err
        missing = set(by_dst[dst]) - hosted
        if missing:
            raise MigrationError(f"actor {dst} does not host {sorted(missing)} after loading them")

    # 2. drops, only once every copy is in place
    by_actor: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for layer, e, a in sorted(drops):
        by_actor[a].append((layer, e))
    drop_refs = {a: cluster.experts[a].drop_shards.remote(keys) for a, keys in by_actor.items()}
    for a, ref in drop_refs.items():
        try:
            ray.get(ref, timeout=MIGRATE_TIMEOUT_S)
        except Exception as err:
            names = ", ".join(_fmt(m) for (_l, _e, x), m in drops.items() if x == a)
            raise MigrationError(f"dropping on actor {a} failed for {names}: {err}") from err

    # 3. new version everywhere; router workers switch to the new placement
    try:
        ray.get(
            [a.set_placement_version.remote(new.version) for a in cluster.experts], timeout=MIGRATE_TIMEOUT_S
        )
        ray.get([w.set_placement.remote(new.to_dict()) for w in cluster.workers], timeout=MIGRATE_TIMEOUT_S)
    except Exception as err:
        raise MigrationError(f"switching to placement version {new.version} failed: {err}") from err
    cluster.placement = new
    return MigrationReport(moved, time.perf_counter() - t0, len(moves), new.version)
