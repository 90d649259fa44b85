"""The overlap set-up of benchmarks/sim_accuracy.py: transport.overlap two_batch vs none on one real cluster, the
measured ratio per round against the simulator's (sim/two_batch.py) on the same steps' routing.

The layout is benchmarks/step.py's overlap measurement (``OVERLAP_LAYOUTS["one_per_core"]``): 1 router worker and
1 expert actor at 1 torch thread each, the `small` preset at sim_accuracy's batch 8 x 128 (two halves of 4 rows;
step.py uses 16 x 128, twice the step time: --quick stays near a minute), so the worker's dense half and the
actor's expert half can each have a core. Both modes run on one cluster, switched
between steps (RouterWorker.set_overlap), the order alternating per round (none, two_batch, two_batch, none, ...);
round 0 is a warm-up of both. Every measured step is simulated in its own mode with the cores other tenants
left during that step and the run's CPU scale (from the other set-ups' calibration steps: this set-up is
predicted, never fitted). Per round: measured ratio = two_batch step / none step, predicted ratio = the same of
the simulated steps; ratio_spread (benchmarks/_common.py) gives median, min-max and a sign test for each.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import ratio_spread
from moe_runtime.config import RuntimeConfig, parse_config
from moe_runtime.sim.hardware import HardwareTable
from moe_runtime.sim.simulator import Simulator

__all__ = ["OVERLAP_SETUP", "measure_overlap", "overlap_config", "simulate_overlap"]

MODES = ("none", "two_batch")
OVERLAP_SETUP = {"name": "1 actor, 1 worker, two_batch vs none", "expert_actors": 1, "router_workers": 1,
                 "batch_size": 8, "seq_len": 128, "torch_threads": 1}  # fmt: skip


def overlap_config(tmp: Path, mode: str = "none") -> RuntimeConfig:
    s = OVERLAP_SETUP
    return parse_config({
        "model": {"preset": "small"},
        "data": {"max_files": 60},
        "train": {"steps": 1000, "batch_size": s["batch_size"], "seq_len": s["seq_len"], "micro_batches": 1,
                  "warmup_steps": 2, "checkpoint_every": 0, "checkpoint_dir": str(tmp / "ckpt")},
        "cluster": {"num_gpus": s["expert_actors"], "expert_actors": s["expert_actors"],
                    "router_workers": s["router_workers"], "cpus_per_actor": 0.0,
                    "torch_threads": s["torch_threads"]},
        "transport": {"wire_dtype": "float32", "overlap": mode},
    })  # fmt: skip


def measure_overlap(rounds: int, tmp: Path, meter_factory: Callable[[], Any], round_trip: Callable[[Any], float],
                    log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Run the set-up: per measured step its mode, round, routing counts [W * M, L, E], the driver's step time and
    the cores left to the cluster (meter_factory(): CpuShare of sim_accuracy.py)."""
    import ray

    from moe_runtime.runtime.cluster import Cluster

    cfg = overlap_config(tmp / "overlap")
    t0 = time.perf_counter()
    steps: list[dict[str, Any]] = []
    with Cluster.start(cfg) as c:
        rtt = round_trip(c)
        meter = meter_factory()
        step = 0
        for r in range(rounds + 1):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                ray.get([w.set_overlap.remote(mode) for w in c.workers], timeout=60)
                meter.start()
                rep = c.train_step(step)
                share = meter.stop()
                step += 1
                if r == 0:  # warm-up of both modes
                    continue
                counts = np.stack([x.numpy().astype(np.int64) for x in rep.worker_loads])
                steps.append({"mode": mode, "round": r, "counts": counts.tolist(), "real_step_s": rep.timings.step_s,
                              "share": share})  # fmt: skip
    log(f"  {OVERLAP_SETUP['name']}: cluster up + {2 * (rounds + 1)} steps in {time.perf_counter() - t0:.1f} s")
    return {"setup": OVERLAP_SETUP, "rounds": rounds, "steps": steps, "ray_round_trip_s": rtt}


def simulate_overlap(rec: dict[str, Any], table: HardwareTable, scale: float, overhead: float, tmp: Path,
                     table_for: Callable[[HardwareTable, float, float, float], HardwareTable]) -> dict[str, Any]:  # fmt: skip
    """Each recorded step simulated in its mode (cores left during it, the run's CPU scale); measured and predicted
    two_batch / none ratios per round, and each mode's step error."""
    cfgs = {mode: overlap_config(tmp / "overlap", mode) for mode in MODES}
    by_round: dict[int, dict[str, tuple[float, float]]] = {}
    errors: dict[str, list[float]] = {mode: [] for mode in MODES}
    for st in rec["steps"]:
        sim = Simulator.from_config(cfgs[st["mode"]], table_for(table, st["share"]["cores"], scale, overhead))
        res = sim.run_step(np.asarray(st["counts"], dtype=np.int64))
        if st["mode"] == "two_batch" and res.overlap != "two_batch":
            raise RuntimeError(f"overlap set-up: the simulator ran {res.overlap!r} for a two_batch step (halves?)")
        by_round.setdefault(st["round"], {})[st["mode"]] = (st["real_step_s"], res.step_time_s)
        errors[st["mode"]].append(res.step_time_s / st["real_step_s"] - 1.0)
    rounds = [by_round[r] for r in sorted(by_round) if len(by_round[r]) == 2]
    real = ratio_spread([r["two_batch"][0] for r in rounds], [r["none"][0] for r in rounds])
    pred = ratio_spread([r["two_batch"][1] for r in rounds], [r["none"][1] for r in rounds])
    ratio_err = [p / m - 1.0 for p, m in zip(pred["ratios"], real["ratios"])]
    idle = {mode: Simulator.from_config(cfgs[mode], dataclasses.replace(table, step_overhead_s=overhead))
            .run_step(np.asarray(rec["steps"][0]["counts"], dtype=np.int64)).step_time_s for mode in MODES}
    return {
        "setup": OVERLAP_SETUP["name"], **{k: OVERLAP_SETUP[k] for k in ("expert_actors", "router_workers",
                                                                          "batch_size", "seq_len")},
        "real_overlap_vs_none": real,
        "sim_overlap_vs_none": pred,
        # the ratio's error: predicted median ratio / measured median ratio - 1, and per round
        "overlap_ratio_error": pred["median"] / real["median"] - 1.0,
        "overlap_ratio_error_rounds": ratio_err,
        "overlap_ratio_error_spread": {"median": statistics.median(ratio_err), "min": min(ratio_err),
                                       "max": max(ratio_err)},
        "step_error": {mode: {"median": statistics.median(e), "min": min(e), "max": max(e)}
                       for mode, e in errors.items()},
        "real_step_s": {mode: statistics.median(r[mode][0] for r in rounds) for mode in MODES},
        "sim_step_s": {mode: statistics.median(r[mode][1] for r in rounds) for mode in MODES},
        "sim_idle_machine_overlap_vs_none": idle["two_batch"] / idle["none"],
        "cores_left_to_cluster": [st["share"]["cores"] for st in rec["steps"]],
        "cpu_scale": scale,
    }  # fmt: skip
