"""What one (micro-batch, layer) asks of the machine: rows per request from the replica split, and the arrays the
engine's queues serve (expert time, bytes, port time and latency per (actor, worker) request)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["WORK_DTYPE", "LayerWork", "ReplicaSlots", "per_actor", "split_rows"]

# [actors, workers] matrices are float32: the waves are memory-bound and float32 halves the traffic;
# 2**-24 relative is 0.1 us on a 1 s step. Per-worker times and totals stay float64.
WORK_DTYPE = np.float32


@dataclass(frozen=True, eq=False)
class ReplicaSlots:
    """One layer's replica slots, sorted by actor: slot i = replica `rank[i]` of expert `expert[i]`."""

    expert: np.ndarray
    rank: np.ndarray
    nrep: np.ndarray
    actor: np.ndarray
    starts: np.ndarray  # first slot of each actor present
    actors_present: np.ndarray

    @classmethod
    def of(cls, replicas_row: tuple[tuple[int, ...], ...]) -> ReplicaSlots:
        ex, rk, nr, ac = [], [], [], []
        for e, actors in enumerate(replicas_row):
            for i, a in enumerate(actors):
                ex.append(e), rk.append(i), nr.append(len(actors)), ac.append(a)
        ex, rk, nr, ac = map(np.asarray, (ex, rk, nr, ac))
        order = np.lexsort((ex, ac))
        ex, rk, nr, ac = ex[order], rk[order], nr[order], ac[order]
        first = np.ones(len(ac), dtype=bool)
        first[1:] = ac[1:] != ac[:-1]
        return cls(ex, rk, nr, ac, np.flatnonzero(first), ac[first])


def split_rows(counts_we: np.ndarray, slots: ReplicaSlots) -> np.ndarray:
    """[W, S] rows per replica slot: ``placement.split_over_replicas`` vectorised over workers (replica i of R
    gets n // R rows, plus one for i < n % R). Kept because calling the rule per (worker, layer) makes a 256-GPU
    step ~1.6x slower (docs/measurements.md); tests/sim checks it equal to split_over_replicas."""
    c = counts_we[:, slots.expert]
    return c // slots.nrep + (slots.rank < c % slots.nrep)


def per_actor(x_ws: np.ndarray, slots: ReplicaSlots, num_actors: int) -> np.ndarray:
    """Sum slot columns per actor: [W, S] -> [W, A]."""
    out = np.zeros((x_ws.shape[0], num_actors), dtype=np.float64)
    out[:, slots.actors_present] = np.add.reduceat(x_ws, slots.starts, axis=1)
    return out


@dataclass(frozen=True, eq=False)
class LayerWork:
    """One (micro-batch, layer): per request (actor, worker) rows, expert time, bytes, port time, latency."""

    time_aw: np.ndarray  # expert compute (forward) of the request
    time_bwd_aw: np.ndarray  # its backward
    bytes_aw: np.ndarray
    mask_aw: np.ndarray  # a request exists (rows > 0)
    svc_aw: np.ndarray  # bytes / bandwidth of the request's link class: time on a port
    lat_aw: np.ndarray  # alpha + rpc overhead + codec: latency after the ports
    svc_wa: np.ndarray  # the same, worker-major (combine ingress)
    lat_max_wc: np.ndarray  # [W, 3] largest latency of a worker's requests per link class
    bytes_wc: np.ndarray  # [W, 3] bytes per worker per link class
    bytes_by_class: np.ndarray  # [3]
    messages: int
    actor_rows: np.ndarray  # [A] forward rows per actor
