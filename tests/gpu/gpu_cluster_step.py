"""A 2-actor local cluster trained for a few steps against the in-process CPU trainer: one JSON line on stdout.

Run in its own process (its own Ray): `python -m tests.gpu.gpu_cluster_step --device cuda|cpu [--steps N]`.
--device cuda: a local Ray advertising the real GPUs, expert actors AND router workers each given a share
(CUDA_VISIBLE_DEVICES is set by Ray; a num_gpus=0 actor sees no GPU). --device cpu: the same layout over one
fake GPU (every party computes on the CPU). Used by tests/gpu/test_gpu_cluster.py and benchmarks/gpu_check.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def run(device: str, steps: int, precision: str = "fp32") -> dict:
    import ray

    from moe_runtime.runtime.cluster import Cluster
    from moe_runtime.training import InProcessTrainer
    from tests.runtime.helpers import make_config

    tmp = Path(tempfile.mkdtemp(prefix="gpu-cluster-"))
    # 2 expert actors + 2 router workers sharing the GPUs; on the CPU the same layout over one fake GPU
    n = torch.cuda.device_count() if device == "cuda" else 1
    share = min(1.0, n / 4)
    cluster = {"num_gpus": n, "gpus_per_expert_actor": share, "gpus_per_router_worker": share}
    cfg = make_config(tmp, train={"steps": steps, "precision": precision}, expert_actors=2, **cluster)

    torch.set_num_threads(1)
    oracle = InProcessTrainer(make_config(tmp, train={"steps": steps}, expert_actors=2, num_gpus=2))
    t0 = time.perf_counter()
    ref = [oracle.train_step(s)[0] for s in range(steps)]
    oracle_s = time.perf_counter() - t0
    ref_state = {k: v.detach().clone() for k, v in oracle.model.state_dict().items()}

    t0 = time.perf_counter()
    with Cluster.start(cfg) as c:
        start_s = time.perf_counter() - t0
        actors = [i.device for i in c.actor_infos]
        workers = [ray.get(w.info.remote())["device"] for w in c.workers]
        res = c.train(steps)
        weights = c.expert_weights()
        dense = c.dense_state(worker=0)
    diffs = {}
    for k, v in {**weights, **dense}.items():
        if k in ref_state:
            diffs[k] = float((v.float() - ref_state[k]).abs().max() / ref_state[k].abs().max().clamp_min(1e-12))
    return {
        "device": device, "precision": precision, "steps": steps, "actor_devices": actors,
        "worker_devices": workers, "losses": res.losses, "oracle_losses": ref, "step_times_s": res.step_times_s,
        "oracle_step_s": oracle_s / steps, "cluster_start_s": start_s,
        "max_rel_weight_diff": max(diffs.values()) if diffs else None, "compared_tensors": len(diffs),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 2
    print(json.dumps(run(a.device, a.steps, a.precision)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
