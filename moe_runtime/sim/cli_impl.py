"""`moe-runtime simulate`: the body of the command (cli.py wires the options to `simulate_command`).

    moe-runtime simulate --config cluster/sim-64gpu.yaml [--trace zipf|uniform|drift|FILE.npz|FILE.jsonl]
        [--steps N] [--what-if rebalance|overlap] [--plot out.png] [--calibrate] [--json]

``--what-if overlap``: transport.overlap none vs two_batch on the same trace (sim/whatif.py ``overlap_whatif``):
the JSON gains ``overlap_vs_none_step_time`` (two_batch / none) and ``what_if`` with both step times, the halves
run one after the other (what splitting costs) and the sum of the parts. The simulation itself follows the
config's transport.overlap.

Tokens per router worker: ``sim.tokens_per_gpu`` with a GPU table (a projection); with a host table (this machine,
``sim.hardware`` pointing at a calibrated YAML, or ``--calibrate``) the config's own batch:
``train.batch_size * train.seq_len / cluster.router_workers``. ``--calibrate`` measures this machine for the
config's model, writes ``runs/sim/host-<preset>.yaml`` and simulates with it; ``--against-cluster`` also runs
the config's local cluster and scales the table to its measured CPU: sim/ never starts a cluster, so the caller
(cli.py) passes that measurement in (``runtime.calibrate_cluster.against_cluster``).
Human-readable lines go to stderr; with ``--json`` the last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe_runtime.config import RuntimeConfig, load_config
from moe_runtime.sim.hardware import HardwareTable, load_table
from moe_runtime.sim.results import summarize
from moe_runtime.sim.simulator import Simulator
from moe_runtime.sim.traces import RoutingTrace, load_trace

__all__ = ["SCALING_GPUS", "ClusterCalibration", "make_trace", "simulate_command", "tokens_per_worker"]

# (config, host table, log) -> {"cpu_scale", "step_overhead_s", ...}: the table measured against the real cluster
ClusterCalibration = Callable[[RuntimeConfig, HardwareTable, Callable[[str], None]], dict[str, Any]]

SYNTHETIC = ("uniform", "zipf", "drift")
WHAT_IFS = (None, "rebalance", "overlap")
SCALING_GPUS = [8, 16, 32, 64, 128, 256]
CALIBRATION_DIR = Path("runs/sim")


def _say(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def tokens_per_worker(cfg: RuntimeConfig, sim: Simulator) -> int:
    """A host table simulates this machine's own cluster (the config's batch); a GPU table projects a cluster."""
    if sim.cost.table.kind == "host":
        return cfg.train.batch_size * cfg.train.seq_len // cfg.cluster.router_workers
    return cfg.sim.tokens_per_gpu


def make_trace(cfg: RuntimeConfig, sim: Simulator, trace: str | None, steps: int) -> RoutingTrace:
    """A trace file, or a synthetic trace (`trace` = uniform | zipf | drift, default sim.trace)."""
    kind = trace or cfg.sim.trace
    if kind in SYNTHETIC:
        tokens = tokens_per_worker(cfg, sim)
        tokens -= tokens % sim.micro_batches
        return sim.synthetic(kind, steps=steps, tokens_per_worker=tokens, zipf_s=cfg.sim.zipf_s, seed=cfg.train.seed)
    return load_trace(kind)


def simulate_command(
    config_path: str | Path,
    trace: str | None = None,
    steps: int | None = None,
    what_if: str | None = None,
    plot: str | Path | None = None,
    calibrate: bool = False,
    as_json: bool = False,
    against_cluster: ClusterCalibration | None = None,
) -> dict[str, Any]:
    """Simulate the config's cluster; returns the JSON summary (and prints it with as_json). `against_cluster`
    (with `calibrate`): refine the calibration on the real cluster with this measurement."""
    if against_cluster is not None and not calibrate:
        raise ValueError("--against-cluster: it refines a calibration; add --calibrate")
    cfg = load_config(config_path)
    table: HardwareTable | None = None
    calibration_path = None
    if calibrate:
        from moe_runtime.sim.calibrate import calibrate as run_calibration
        from moe_runtime.sim.calibrate import write_table

        _say("calibrating this machine (experts, dense layer, head, optimizer, codec, gRPC, gloo) ...")
        t0 = time.perf_counter()
        measured = run_calibration(cfg, log=lambda m: _say(f"  {m}"))
        if against_cluster is not None:
            _say(f"calibrating against the real local cluster of {config_path} ...")
            check = against_cluster(cfg, HardwareTable.from_dict(measured), lambda m: _say(f"  {m}"))
            measured["cpu_scale"] = check["cpu_scale"]
            measured["step_overhead_s"] = check["step_overhead_s"]
            measured["measured"]["cluster"] = check
            _say(f"  cluster CPU / table CPU: {check['cpu_scale']:.2f} (every cost scaled by it)")
        calibration_path = write_table(measured, CALIBRATION_DIR / f"host-{cfg.model.preset or 'custom'}.yaml")
        table = load_table(calibration_path)
        _say(f"calibration written to {calibration_path} ({time.perf_counter() - t0:.1f} s)")
    else:
        table = load_table(cfg.sim.hardware)
    sim = Simulator.from_config(cfg, table)
    if what_if not in WHAT_IFS:
        raise ValueError(f"--what-if {what_if!r}: expected one of {', '.join(w for w in WHAT_IFS if w)}")
    is_file = trace is not None and trace not in SYNTHETIC
    tr = make_trace(cfg, sim, trace, steps or 1)
    n = steps or (tr.num_steps if is_file else 1)
    t0, c0 = time.perf_counter(), time.process_time()
    results = sim.run(tr, n)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = summarize(results)
    out.update(
        config=str(config_path), hardware=table.name, trace=trace or cfg.sim.trace, steps=n,
        tokens_per_worker=int(tr.tokens()[0].mean()), sim_wall_s=wall, sim_cpu_s=cpu,
        sim_wall_s_per_step=wall / n, training=sim.training,
    )  # fmt: skip
    if calibration_path is not None:
        out["calibration"] = str(calibration_path)
    _say(f"{sim.layout.num_workers} router workers, {sim.layout.num_actors} expert actors, "
         f"{out['layout']} on {out['devices']} devices, table {table.name}, trace {out['trace']}, {n} step(s)")  # fmt: skip
    _say(f"step time {out['step_time_s'] * 1e3:.2f} ms (forward+backward {out['phases']['forward_backward_s'] * 1e3:.2f}, "
         f"grad sync {out['phases']['grad_sync_s'] * 1e3:.2f}, optimizer {out['phases']['optimizer_s'] * 1e3:.2f}); "
         f"imbalance {out['imbalance']:.3f}; GPU busy {out['gpu_busy_mean']:.1%}; "
         f"{out['bytes_moved_per_step'] / 1e9:.3f} GB moved; simulated in {wall:.3f} s")  # fmt: skip
    if what_if == "rebalance":
        from moe_runtime.sim.whatif import rebalance_whatif

        t1 = time.perf_counter()
        m = cfg.model
        _say(f"what-if rebalance: the scheduler decides a placement for {sim.layout.num_actors} actors x "
             f"{m.num_layers} layers x {m.num_experts} experts (about 20 s at 256 GPUs) ...")  # fmt: skip
        wi = rebalance_whatif(sim, tr, n, cfg.scheduler)
        out["what_if"] = {**wi.to_dict(), "wall_s": time.perf_counter() - t1}
        _say(f"what-if rebalance: static {wi.static_step_s * 1e3:.2f} ms -> scheduler {wi.rebalanced_step_s * 1e3:.2f} ms"
             f" (speed-up {wi.speedup:.3f}x; imbalance {wi.static_imbalance:.2f} -> {wi.rebalanced_imbalance:.2f}; "
             f"{wi.bytes_to_move / 1e9:.2f} GB to move): {wi.reason}")  # fmt: skip
    if what_if == "overlap":
        from moe_runtime.sim.whatif import overlap_whatif

        t1 = time.perf_counter()
        ov = overlap_whatif(sim, tr, n)
        out["what_if"] = {**ov, "wall_s": time.perf_counter() - t1}
        out["overlap_vs_none_step_time"] = ov["overlap_vs_none_step_time"]
        if ov["splittable"]:
            _say(f"what-if overlap: none {ov['none_step_s'] * 1e3:.2f} ms -> two_batch {ov['two_batch_step_s'] * 1e3:.2f}"
                 f" ms (overlap / none {ov['overlap_vs_none_step_time']:.3f}; halves one after the other "
                 f"{ov['split_sequential_step_s'] * 1e3:.2f} ms: splitting costs {ov['split_vs_none_step_time']:.3f}x,"
                 f" overlapping gains {ov['overlap_vs_split_step_time']:.3f}x)")  # fmt: skip
        else:
            _say(f"what-if overlap: nothing to split: {ov['reason']}")
    if plot:
        from moe_runtime.sim.plot import plot_simulation
        from moe_runtime.sim.whatif import scaling

        one = sim.run_step(tr.step(0), record_timeline=True)
        if sim.cost.table.kind == "host":  # this machine: no cluster sizes to scan
            scale = []
        else:
            tok = tokens_per_worker(cfg, sim)
            scale = scaling(sim.cost, SCALING_GPUS, cfg.sim.gpus_per_node, kind=cfg.sim.trace, zipf_s=cfg.sim.zipf_s,
                            tokens_per_worker=tok, training=sim.training, seed=cfg.train.seed)  # fmt: skip
            out["scaling"] = scale
        after = None  # with --what-if rebalance: the same step under the scheduler's placement, drawn below
        if what_if == "rebalance" and wi.placement is not None:
            after = sim.run_step(tr.step(0), wi.placement, record_timeline=True)
        path = plot_simulation(one, scale, plot, title=f"{Path(str(config_path)).name}: {table.name}", rebalanced=after)
        out["plot"] = str(path)
        _say(f"plot written to {path}")
    if as_json:
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    return out
