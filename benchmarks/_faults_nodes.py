"""The node-loss scenarios of benchmarks/faults.py, in a child process with its own simulated 2-node Ray
(ray.cluster_utils.Cluster, 4 fake GPUs per node): every expert replicated on both nodes
(scheduler/anti_affinity.cross_node_replicas), then the second node is removed
- while serving: requests counted failed or answered (compared with the answer before the loss), time to the
  first answer and until status() is healthy again (the lost parties restarted on the head and repaired);
- during training (a fresh node and cluster; not with --quick, to keep it under 3 minutes): steps re-run, losses
  against the clean run of the parent, the run's wall time minus a clean run's on this cluster.

    python benchmarks/_faults_nodes.py TMPDIR STEPS REQUESTS [quick] [wait]   (prints one line: RESULT {json})

`wait`: once its cluster is up, print READY and wait for a line GO on stdin before the node is removed.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NODE = {"num_cpus": 1, "num_gpus": 4, "node_ip_address": "127.0.0.1", "object_store_memory": 128 << 20}
# --quick: Ray finds the lost node in ~1.5 s (3 missed health checks 0.5 s apart) instead of its default ~15 s
# (5 missed, 3 s apart), which is most of the quick run's node-loss recovery time and not the runtime's
FAST_NODE_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_timeout_ms": 500}


def _spread(c, sim):
    from moe_runtime.scheduler.anti_affinity import cross_node_replicas

    node = next(iter(sim.worker_nodes))
    c.rebalance(cross_node_replicas(c.placement))
    lost = [i.index for i in c.actor_infos if i.node_id == node.node_id]
    lost_w = [i for i, n in enumerate(c.worker_nodes) if n == node.node_id]
    return node, lost, lost_w


def _serving(c, sim, requests: int) -> dict:
    import torch

    from benchmarks.faults import _wait_healthy

    node, lost, lost_w = _spread(c, sim)
    probe = torch.randint(0, c.cfg.model.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    want = c.forward(probe)
    sim.remove_node(node, allow_graceful=False)
    t0 = time.perf_counter()
    failed, first_ok = 0, None
    for _ in range(requests):
        try:
            torch.testing.assert_close(c.forward(probe), want, rtol=1e-5, atol=1e-6)
            first_ok = first_ok if first_ok is not None else time.perf_counter() - t0
        except Exception:  # noqa: BLE001  (counted: a failed request)
            failed += 1
    _wait_healthy(c, 180.0)
    healthy_s = time.perf_counter() - t0
    equal = True
    try:
        torch.testing.assert_close(c.forward(probe), want, rtol=1e-5, atol=1e-6)
    except AssertionError:
        equal = False
    return {"failed_requests": failed, "requests": requests, "first_ok_s": first_ok, "recovery_s": healthy_s,
            "lost_actors": lost, "lost_workers": lost_w, "answers_equal_after": equal}  # fmt: skip


def _training(c, sim, steps: int) -> dict:
    c.prepare_training()  # the optimizers built now, not in the clean run's first step
    c.restore(c.init_dir)
    t0 = time.perf_counter()
    clean = c.train(steps)
    clean_s = time.perf_counter() - t0
    c.restore(c.init_dir)
    node, lost, lost_w = _spread(c, sim)
    rerun0 = c.steps_rerun

    def progress(step: int, loss: float) -> None:
        if step == 1:  # lands in step 2
            threading.Timer(0.05, sim.remove_node, (node,), {"allow_graceful": False}).start()

    t0 = time.perf_counter()
    result = c.train(steps, progress=progress)
    wall = time.perf_counter() - t0
    return {"losses": result.losses, "clean_losses": clean.losses, "recovery_s": max(0.0, wall - clean_s),
            "wall_s": wall, "clean_wall_s": clean_s, "steps_rerun": c.steps_rerun - rerun0,
            "lost_actors": lost, "lost_workers": lost_w}  # fmt: skip


def _wait_for_go() -> bool:
    """Say READY, then wait for the parent's GO (benchmarks/faults.py starts this early, runs it last)."""
    print("READY", flush=True)
    return sys.stdin.readline().strip() == "GO"


def main(tmp: Path, steps: int, requests: int, quick: bool = False, wait: bool = False) -> dict:
    import torch

    from benchmarks.faults import _config
    from moe_runtime.config import ClusterConfig
    from moe_runtime.runtime.cluster import Cluster
    from moe_runtime.runtime.ray_env import start_ray

    torch.set_num_threads(1)
    env = start_ray(ClusterConfig(num_nodes=2, num_gpus=8, expert_actors=4), log_to_driver=False,
                    system_config=FAST_NODE_CHECKS if quick else None)
    sim = env._sim
    out: dict = {}
    try:
        cfg = _config(tmp, steps, quick)
        cfg = cfg.model_copy(update={
            "cluster": cfg.cluster.model_copy(update={"num_gpus": 8}),
            "train": cfg.train.model_copy(update={"checkpoint_every": 0})})  # a rollback would raise
        with Cluster.start(cfg) as c:
            if wait and not _wait_for_go():
                return out  # the parent gave up (stdin closed without GO)
            out["serving"] = _serving(c, sim, requests)
        if quick:
            return out
        sim.add_node(**NODE)
        sim.wait_for_nodes()
        with Cluster.start(cfg) as c:
            c.init_dir = c.checkpoint(tmp / "nodes-init")
            out["training"] = _training(c, sim, steps)
    finally:
        env.shutdown()
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), "quick" in sys.argv[4:],
                                      "wait" in sys.argv[4:])), flush=True)  # fmt: skip
