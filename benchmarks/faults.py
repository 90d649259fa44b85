"""Faults on a live local cluster (tiny model, 4 expert actors, 2 router workers): how long recovery takes, how
many requests fail, how many steps are re-run, against a clean run in the same process.

    python benchmarks/faults.py [--quick] [--json]

Scenarios (each starts from the same step-0 state; kills hit only this cluster's actor PIDs):
- serving, replicas: every expert of actor 2 also on actor 3; SIGKILL actor 2 between requests; count failed
  requests, time the first request after the kill (failover) and until status() is healthy again (rejoin);
- serving, no replica: SIGKILL actor 1; the request fails naming actor / layer / experts; time to rejoin;
- training, replicas: SIGKILL actor 2 during a step; only that step is re-run; recovery time = the run's wall
  time minus the clean run's; losses compared with the clean run;
- training, rollback: same without replicas: rolled back to the last checkpoint;
- hang, control plane: SIGSTOP an expert actor, then a checkpoint: time until the call fails naming it
  (cluster.hang_timeout_s), and until recover() has killed, restarted and restored it;
- hang, data plane, training: SIGSTOP an expert actor (router worker) while a step is in flight: the router workers'
  deadline transport.deadline_s (the straggler bound cluster.hang_timeout_s after the other worker finished,
  runtime/hangs.py) fails the step naming it; time from the stop to the failed step (detected) and to the end of
  the run minus a clean run (recovery: ping, kill, restart, repair from replicas, the step re-run);
- hang, data plane, serving: SIGSTOP an expert actor (router worker) while a forward is in flight, then a second
  request once the stop has landed (a fast data plane may answer the first before it): the request that meets the
  stopped party still answers (rows re-sent to a replica / to the other worker) after about one deadline; failed
  requests, both request times, and time until status() is healthy again;
- node loss (a child process with its own 2-node Ray, benchmarks/_faults_nodes.py): every expert on both nodes,
  the second node removed while serving (failed requests, first answer, until healthy) and during training
  (steps re-run, losses equal; not with --quick: the node_loss_training_* fields are then null);
- scale: 4 -> 6 -> 3 expert actors between training steps; losses compared with the clean run.

Last stdout line (and runs/bench/faults.json): serving_failed_requests_with_replicas, serving_failover_s,
serving_rejoin_s, training_recovery_with_replicas_s, steps_rerun_with_replicas, training_losses_equal_with_replicas,
training_recovery_rollback_s, steps_rerun_rollback, hang_detected_s (control plane), hang_timeout_s,
hang_recovered_s, data_plane_hang_detected_s, data_plane_hang_deadline_s, data_plane_hang_recovered_s,
worker_hang_detected_s, worker_hang_recovered_s, serving_hang_failed_requests, serving_expert_hang_answered_s,
serving_worker_hang_answered_s, node_loss_failed_requests, node_loss_failover_s, node_loss_recovery_s,
node_loss_training_recovery_s, node_loss_steps_rerun, node_loss_losses_equal, scale_losses_equal, scale_up_s,
scale_down_s, and ratios against the clean forward / step times.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import emit, make_parser, stderr_console  # noqa: E402

NAME = "faults"
HANG_TIMEOUT_S = 2.0  # the control-call hang scenario (--quick: QUICK_HANG_TIMEOUT_S)
QUICK_HANG_TIMEOUT_S = 1.0  # a checkpoint of the tiny model takes ~50 ms
DEADLINE_S = 3.0  # data plane (transport.deadline_s)
DATA_HANG_TIMEOUT_S = 5.0  # cluster.hang_timeout_s elsewhere: above the data-plane deadline (a worker waiting on
# a stopped expert actor must fail its exchange before the driver counts the worker itself as hung)
QUICK_DEADLINE_S, QUICK_DATA_HANG_TIMEOUT_S = 1.5, 3.0  # --quick: half; a clean step is ~0.16 s, a call ~ms


def timeouts(quick: bool) -> tuple[float, float]:
    """(transport.deadline_s, cluster.hang_timeout_s) of the run."""
    return (QUICK_DEADLINE_S, QUICK_DATA_HANG_TIMEOUT_S) if quick else (DEADLINE_S, DATA_HANG_TIMEOUT_S)


def _config(tmp: Path, steps: int, quick: bool = False):
    from moe_runtime.config import parse_config

    deadline_s, hang_timeout_s = timeouts(quick)
    return parse_config({
        "model": {"preset": "tiny"},
        "data": {"max_files": 40},
        "train": {"steps": steps, "batch_size": 8, "seq_len": 32, "micro_batches": 2, "warmup_steps": 2,
                  "checkpoint_every": 2, "checkpoint_dir": str(tmp / "auto")},
        "transport": {"deadline_s": deadline_s},
        "cluster": {"num_gpus": 6, "expert_actors": 4, "router_workers": 2, "hang_timeout_s": hang_timeout_s,
                    "max_restarts": 10},  # every scenario kills an actor again
    })  # fmt: skip


def _pid(handle) -> int:
    import ray

    return ray.get(handle.ping.remote(), timeout=60)


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    os.kill(pid, sig)
    if sig == signal.SIGKILL:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.01)


def _replicate(c, actor: int):
    p = c.placement
    other = (actor + 1) % p.num_actors
    rows = [list(r) for r in p.replicas]
    for layer, e in p.shards_of(actor):
        if other not in rows[layer][e]:
            rows[layer][e] = tuple(rows[layer][e]) + (other,)
    return p.with_replicas(tuple(tuple(r) for r in rows))


def _wait_healthy(c, timeout_s: float = 120.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        c.wait_healed(timeout_s)
        if c.status()["healthy"]:
            return time.perf_counter() - t0
        time.sleep(0.1)
    raise RuntimeError(f"cluster not healthy {timeout_s} s after the fault")


def _serving(c, probe, requests: int, replicas: bool, log) -> dict:
    import torch

    c.restore(c.init_dir)
    if replicas:
        c.rebalance(_replicate(c, 2))
    c.checkpoint(c.serve_dir)  # of this step: an actor with no live replica reloads from it
    want = c.forward(probe)
    clean = []
    for _ in range(3):
        t0 = time.perf_counter()
        c.forward(probe)
        clean.append(time.perf_counter() - t0)
    victim = 2 if replicas else 1
    pid = _pid(c.experts[victim])
    _kill(pid)
    t_kill = time.perf_counter()
    failed, first_ok, latencies = 0, None, []
    for _ in range(requests):
        t0 = time.perf_counter()
        try:
            got = c.forward(probe)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            if first_ok is None:
                first_ok = time.perf_counter() - t_kill
        except Exception as err:  # noqa: BLE001  (counted: a failed request)
            failed += 1
            log(f"  request failed: {str(err).splitlines()[0][:160]}")
        latencies.append(time.perf_counter() - t0)
    _wait_healthy(c)
    rejoin = time.perf_counter() - t_kill  # kill -> every actor whole, wired and answering again
    clean_s = sorted(clean)[1]
    return {"failed_requests": failed, "requests": requests, "first_ok_after_kill_s": first_ok,
            "first_request_s": latencies[0], "clean_forward_s": clean_s,
            "first_request_vs_clean": latencies[0] / clean_s, "rejoin_s": rejoin}  # fmt: skip


def _training(c, steps: int, clean_losses, clean_s: float, replicas: bool, hang: bool = False,
              party: str = "expert") -> dict:  # fmt: skip
    import torch

    c.restore(c.init_dir)
    if replicas:
        c.rebalance(_replicate(c, 2))
    c.prepare_training()  # parties restarted by an earlier scenario build their optimizers now, not in the timed run
    victim = _pid(c.experts[2]) if party == "expert" else c.worker_pids[1]
    failed_at: list[float] = []
    step_fn = c.train_step

    def train_step(step=None):  # the moment the step fails = the moment the fault was detected
        try:
            return step_fn(step)
        except BaseException:
            failed_at.append(time.perf_counter())
            raise

    c.train_step = train_step
    before, rerun0 = c.recoveries, c.steps_rerun
    fired: list[float] = []
    done: list[int] = []  # every completed step, a replayed one again
    sig = signal.SIGSTOP if hang else signal.SIGKILL

    def progress(step: int, loss: float) -> None:
        done.append(step)
        if step == 2 and not fired:
            fired.append(time.perf_counter() + 0.03)
            threading.Timer(0.03, os.kill, (victim, sig)).start()

    t0 = time.perf_counter()
    try:
        result = c.train(steps, progress=progress)
    finally:
        del c.train_step
        if hang:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
    wall = time.perf_counter() - t0
    equal = True
    try:
        torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(clean_losses), rtol=1e-4, atol=0)
    except AssertionError:
        equal = False
    return {"recovery_s": max(0.0, wall - clean_s), "wall_s": wall, "clean_wall_s": clean_s,
            "recovery_vs_clean_step": max(0.0, wall - clean_s) / (clean_s / steps),
            # steps executed again: the failed one, plus any replayed after a rollback
            "steps_rerun": (len(done) - len(set(done))) + (1 if c.recoveries > before else 0),
            "recoveries": c.recoveries - before,
            "rolled_back": c.steps_rerun - rerun0 == 0, "losses_equal": equal,
            "detected_s": failed_at[0] - fired[0] if failed_at and fired else None}  # fmt: skip


def _serving_hang(c, probe, party: str, log) -> dict:
    """SIGSTOP an expert actor (every expert of it replicated) or a router worker while a forward is in flight."""
    import torch

    c.restore(c.init_dir)
    c.rebalance(_replicate(c, 2))
    want = c.forward(probe)
    pid = _pid(c.experts[2]) if party == "expert" else c.worker_pids[1]
    timer = threading.Timer(0.02, os.kill, (pid, signal.SIGSTOP))
    failed = 0

    def request() -> None:
        nonlocal failed
        try:
            torch.testing.assert_close(c.forward(probe), want, rtol=1e-5, atol=1e-6)
        except Exception as err:  # noqa: BLE001  (counted: a failed request)
            failed += 1
            log(f"  request failed: {str(err).splitlines()[0][:160]}")

    try:
        times = []
        for _ in range(2):  # the first is in flight when the stop lands; the second is sent once it has landed
            t0 = time.perf_counter()
            if not times:
                timer.start()
            request()
            times.append(time.perf_counter() - t0)
            timer.join()
        # the request that met the stopped party (a fast data plane can answer the first within the timer's 20 ms,
        # before the stop: then only the second meets it; else the second goes around it)
        answered = max(times)
        healthy = _wait_healthy(c) + answered
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {"failed_requests": failed, "answered_s": answered, "healthy_s": healthy, "request_s": times}


class _NodeLossChild:
    """benchmarks/_faults_nodes.py in a child process (its own simulated 2-node Ray). Started first: it builds its
    Ray and cluster while this process starts its own (~11 s of the child's ~18 s), then waits; `run` lets it go
    once the other scenarios are done and no timed scenario shares the machine with its start (its idle Ray
    takes ~0.1 core)."""

    READY_TIMEOUT_S = 300.0

    def __init__(self, tmp: Path, steps: int, requests: int, quick: bool):
        self._err = open(tmp / "node-loss.stderr", "w+")  # noqa: SIM115  (closed in run or kill)
        self._proc = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "_faults_nodes.py"), str(tmp / "nodes"), str(steps),
             str(requests), *(["quick"] if quick else []), "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._err, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
        self._lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, name="node-loss-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            self._lines.append(line)
            if line.startswith("READY"):
                self._ready.set()
        self._ready.set()  # ended without READY: wait_ready returns, run reports the failure

    def wait_ready(self) -> None:
        self._ready.wait(self.READY_TIMEOUT_S)

    def run(self, log) -> dict:
        """Let the child remove its node and measure; its RESULT, or {} (logged) when it failed."""
        try:
            if self._proc.poll() is None:
                self._proc.stdin.write("GO\n")
                self._proc.stdin.flush()
            self._proc.stdin.close()
            rc = self._proc.wait(timeout=400)
        except (subprocess.TimeoutExpired, BrokenPipeError, OSError) as err:
            self._proc.kill()
            rc = f"{type(err).__name__}: {err}"
        self._reader.join(10)
        self._err.seek(0)
        err_tail = self._err.read()[-2000:]
        self._err.close()
        results = [ln for ln in self._lines if ln.startswith("RESULT ")]
        if rc or not results:
            log(f"  node-loss child failed (rc {rc}): {err_tail}")
            return {}
        return json.loads(results[-1][len("RESULT "):])

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(30)
        self._err.close()


def _control_hang(c, tmp: Path, timeout_s: float) -> dict:
    import ray

    c.restore(c.init_dir)
    pid = _pid(c.experts[1])
    old = (c.cfg, c.fleet.timeout_s)  # this scenario's deadline: timeout_s
    c.cfg = c.cfg.model_copy(update={"cluster": c.cfg.cluster.model_copy(update={"hang_timeout_s": timeout_s})})
    c.fleet.timeout_s = timeout_s
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.perf_counter()
        named = False
        try:
            c.checkpoint(tmp / "hang")
        except ray.exceptions.GetTimeoutError as err:
            named = "expert actor 1" in str(err)
        detected = time.perf_counter() - t0
        t1 = time.perf_counter()
        c.recover(c.init_dir)
        recovered = time.perf_counter() - t1
    finally:
        c.cfg, c.fleet.timeout_s = old
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {"detected_s": detected, "named": named, "recovered_s": recovered, "restarted": _pid(c.experts[1]) != pid}


def _scale(c, steps: int, clean_losses) -> dict:
    """4 -> 6 -> 3 expert actors between training steps; back to 4 afterwards."""
    import torch

    c.restore(c.init_dir)
    losses, times = [], {}
    plan = {2: 6, 3: 3}  # before step 2 scale to 6, before step 3 to 3
    for step in range(steps):
        if step in plan:
            rep = c.scale(plan[step])
            times[f"to_{plan[step]}_s"] = rep.seconds
        losses.append(c.train_step().loss)
    c.scale(4)
    equal = True
    try:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(clean_losses), rtol=1e-4, atol=0)
    except AssertionError:
        equal = False
    return {"losses_equal": equal, **times}


def _scenarios(cfg, tmp: Path, steps: int, requests: int, control_timeout_s: float, child: _NodeLossChild, log,
               quick: bool):
    """Every scenario on one cluster, then the node-loss child's: (its result, (clean run, seconds), results)."""
    import torch

    from moe_runtime.runtime.cluster import Cluster

    with Cluster.start(cfg) as c:
        c.init_dir = c.checkpoint(tmp / "init")
        c.serve_dir = tmp / "serve"
        probe = torch.randint(0, c.cfg.model.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
        c.prepare_training()  # the optimizers built now, not in the clean run's first step
        child.wait_ready()  # its start (CPU-heavy) shares the machine with no timed scenario
        log("clean training run (baseline)")
        c.restore(c.init_dir)
        t0 = time.perf_counter()
        clean = c.train(steps)
        clean_s = time.perf_counter() - t0
        log("serving with replicas: kill actor 2")
        serve_rep = _serving(c, probe, requests, True, log)
        log("serving without a replica: kill actor 1")
        serve_none = _serving(c, probe, 2, False, log)
        log("training with replicas: kill actor 2 in step 3")
        train_rep = _training(c, steps, clean.losses, clean_s, True)
        log("training without replicas: kill actor 2 in step 3 (rollback)")
        train_rb = _training(c, steps, clean.losses, clean_s, False)
        log("hang in a control call: SIGSTOP actor 1, checkpoint")
        hang = _control_hang(c, tmp, control_timeout_s)
        log("hang in the data plane: SIGSTOP actor 2 in step 3 (replicas)")
        hang_dp = _training(c, steps, clean.losses, clean_s, True, hang=True)
        log("hang in the data plane: SIGSTOP router worker 1 in step 3")
        hang_w = _training(c, steps, clean.losses, clean_s, True, hang=True, party="worker")
        log("hang in the data plane while serving: SIGSTOP actor 2, then router worker 1, mid-forward")
        serve_hang_e = _serving_hang(c, probe, "expert", log)
        serve_hang_w = _serving_hang(c, probe, "worker", log)
        log("scale 4 -> 6 -> 3 expert actors between steps")
        scaled = _scale(c, steps, clean.losses)
    # after the others, not beside them: a start sharing the 2 cores slowed restarted parties past --quick's 3 s
    # timeouts (the child's start ran beside this cluster's, before any timed scenario)
    log("node loss (child process, 2 simulated nodes): serving" + ("" if quick else ", then training"))
    nodes = child.run(log)
    return nodes, (clean, clean_s), (serve_rep, serve_none, train_rep, train_rb, hang, hang_dp, hang_w, serve_hang_e,
                                     serve_hang_w, scaled)  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = make_parser(NAME, __doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    console = stderr_console()
    log = console.log
    import torch

    from moe_runtime.runtime.ray_env import start_ray

    torch.set_num_threads(1)
    steps = 4 if args.quick else 6
    requests = 4 if args.quick else 10
    control_timeout_s = QUICK_HANG_TIMEOUT_S if args.quick else HANG_TIMEOUT_S
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moe-faults-") as tmpdir:
        tmp = Path(tmpdir)
        cfg = _config(tmp, steps, args.quick)
        env = start_ray(cfg.cluster)  # before the child starts its own Ray: never two Ray starts at once
        child = _NodeLossChild(tmp, steps, requests, args.quick)
        try:
            nodes, clean, scenarios = _scenarios(cfg, tmp, steps, requests, control_timeout_s, child, log, args.quick)
        finally:
            child.kill()
            env.shutdown()  # a no-op on a Ray this process did not start here (benchmarks/_suite.py)
    serve_rep, serve_none, train_rep, train_rb, hang, hang_dp, hang_w, serve_hang_e, serve_hang_w, scaled = scenarios
    clean, clean_s = clean
    node_serve, node_train = nodes.get("serving", {}), nodes.get("training", {})
    node_equal = None
    if node_train:
        node_equal = bool(torch.allclose(torch.tensor(node_train["losses"]), torch.tensor(clean.losses), rtol=1e-4,
                                         atol=0))  # fmt: skip
    result = {
        "bench": NAME,
        "quick": args.quick,
        "serving_failed_requests_with_replicas": serve_rep["failed_requests"],
        "serving_failover_s": serve_rep["first_ok_after_kill_s"],
        "serving_failover_vs_clean_forward": serve_rep["first_request_vs_clean"],
        "serving_rejoin_s": serve_rep["rejoin_s"],
        "serving_failed_requests_without_replicas": serve_none["failed_requests"],
        "serving_rejoin_without_replicas_s": serve_none["rejoin_s"],
        "training_recovery_with_replicas_s": train_rep["recovery_s"],
        "steps_rerun_with_replicas": train_rep["steps_rerun"],
        "training_losses_equal_with_replicas": train_rep["losses_equal"],
        "training_recovery_rollback_s": train_rb["recovery_s"],
        "steps_rerun_rollback": train_rb["steps_rerun"],
        "training_losses_equal_rollback": train_rb["losses_equal"],
        "hang_detected_s": hang["detected_s"],
        "hang_timeout_s": control_timeout_s,
        "hang_detected_vs_timeout": hang["detected_s"] / control_timeout_s,
        "hang_named_the_actor": hang["named"],
        "hang_recovered_s": hang["recovered_s"],
        "data_plane_hang_detected_s": hang_dp["detected_s"],
        "data_plane_hang_deadline_s": timeouts(args.quick)[0],
        "data_plane_hang_recovered_s": hang_dp["recovery_s"],
        "data_plane_hang_losses_equal": hang_dp["losses_equal"],
        "worker_hang_detected_s": hang_w["detected_s"],
        "worker_hang_timeout_s": timeouts(args.quick)[1],
        "worker_hang_recovered_s": hang_w["recovery_s"],
        "worker_hang_steps_rerun": hang_w["steps_rerun"],
        "worker_hang_losses_equal": hang_w["losses_equal"],
        "serving_hang_failed_requests": serve_hang_e["failed_requests"] + serve_hang_w["failed_requests"],
        "serving_expert_hang_answered_s": serve_hang_e["answered_s"],
        "serving_worker_hang_answered_s": serve_hang_w["answered_s"],
        "serving_worker_hang_healthy_s": serve_hang_w["healthy_s"],
        # both requests of each (answered_s: the slower, the one that met the stopped party)
        "serving_hang_request_s": {"expert": serve_hang_e["request_s"], "worker": serve_hang_w["request_s"]},
        "node_loss_failed_requests": node_serve.get("failed_requests"),
        "node_loss_failover_s": node_serve.get("first_ok_s"),
        "node_loss_recovery_s": node_serve.get("recovery_s"),
        "node_loss_training_recovery_s": node_train.get("recovery_s"),
        "node_loss_steps_rerun": node_train.get("steps_rerun"),
        "node_loss_losses_equal": node_equal,
        "scale_losses_equal": scaled["losses_equal"],
        "scale_up_s": scaled.get("to_6_s"),
        "scale_down_s": scaled.get("to_3_s"),
        "clean_step_s": clean_s / steps,
        "detail": {"serving_replicas": serve_rep, "serving_no_replica": serve_none, "training_replicas": train_rep,
                   "training_rollback": train_rb, "hang_control": hang, "hang_data_plane": hang_dp,
                   "hang_worker": hang_w, "serving_hang_expert": serve_hang_e, "serving_hang_worker": serve_hang_w,
                   "node_loss": nodes, "scale": scaled},
        "total_s": time.perf_counter() - t_start,
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
