"""Every shipped config parses, and its moe-runtime section loads as a RuntimeConfig."""

from pathlib import Path

import yaml

from moe_runtime.config import load_config, parse_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def test_local_configs_load():
    local = load_config(CLUSTER / "local.yaml")
    assert (local.cluster.num_gpus, local.cluster.expert_actors, local.cluster.router_workers) == (4, 4, 2)
    assert local.model.preset == "tiny" and local.model.router == "attention"
    multi = load_config(CLUSTER / "local-multinode.yaml")
    assert multi.cluster.num_nodes == 2


def test_gpu_config_and_ray_up_reference_it():
    gpu = load_config(CLUSTER / "gpu.yaml")
    assert gpu.cluster.ray_address == "auto" and gpu.transport.wire_dtype == "bfloat16"
    ray_up = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(ray_up))  # Ray's own schema (defaults filled in): no unknown keys
    assert "." in ray_up["file_mounts"].values()  # ships the repo, so cluster/gpu.yaml is on every node
    assert any("torch==2.13.0" in c for c in ray_up["setup_commands"])


def test_kuberay_embeds_a_valid_config():
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()))
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    job = next(d for d in docs if d["kind"] == "RayJob")
    cfg = parse_config(yaml.safe_load(config_map["data"]["moe-runtime.yaml"]), source="kuberay.yaml ConfigMap")
    assert cfg.cluster.ray_address == "auto"
    assert "/etc/moe-runtime/moe-runtime.yaml" in job["spec"]["entrypoint"]
    assert job["spec"]["entrypoint"].startswith("moe-runtime train")
