"""Calibrating a host table against the real local cluster (`simulate --calibrate --against-cluster`)."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.config import parse_config
from moe_runtime.runtime.calibrate_cluster import CONTROL_ROUNDS, against_cluster, measure_cluster_cpu_scale
from tests.runtime.helpers import SESSION_GPUS
from tests.sim.helpers import host_table


def _config(tmp_path, actors: int = 2):
    return parse_config({
        "model": {"preset": "tiny"}, "data": {"max_files": 60},
        "train": {"batch_size": 4, "seq_len": 32, "checkpoint_every": 0, "checkpoint_dir": str(tmp_path / "ck")},
        "cluster": {"num_gpus": actors, "expert_actors": actors, "router_workers": 1, "torch_threads": 1},
    })  # fmt: skip


@pytest.mark.slow
def test_cluster_cpu_scale_is_measured_on_the_real_cluster(ray_session, tmp_path):
    cfg = _config(tmp_path)
    logs: list[str] = []
    threads = torch.get_num_threads()
    try:
        out = measure_cluster_cpu_scale(cfg, host_table(cores=2), warmup=1, steps=2, log=logs.append)
    finally:
        torch.set_num_threads(threads)
    assert len(out["cluster_cpu_s"]) == len(out["table_cpu_s"]) == 2 and len(logs) == 2
    assert all(c > 0 for c in out["cluster_cpu_s"]) and all(t > 0 for t in out["table_cpu_s"])
    assert out["cpu_scale"] == pytest.approx(sum(out["cluster_cpu_s"]) / sum(out["table_cpu_s"]))
    assert 0 < out["step_overhead_s"] < 1.0
    assert out["step_overhead_s"] == pytest.approx(CONTROL_ROUNDS * out["ray_round_trip_s"])


def test_a_cluster_that_cannot_start_is_a_usage_error(ray_session, tmp_path):
    cfg = _config(tmp_path, actors=SESSION_GPUS + 2)  # more GPUs than the session's Ray has
    with pytest.raises(ValueError, match=r"--against-cluster: the cluster of c\.yaml cannot start here"):
        against_cluster("c.yaml")(cfg, host_table(cores=2), lambda _m: None)
