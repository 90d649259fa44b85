"""The real-width slice (cluster/yuan-m32-slice.yaml: hidden 2048, 16 heads x 256, RoPE on 128, 2 layers of 32
experts of ffn 8192, vocab 135040, experts stored in bf16, fp32 compute), run here with its first layer only (the
real geometry and expert count; the second layer doubles the 3.4 GB checkpoint write and both loads, ~60 s of CI, and
adds nothing the tiny multi-layer tests do not check; `benchmarks/real_width.py` runs both layers), from a
random-weight bf16 checkpoint written to tmp: logits and greedy generation through the cluster (4 expert actors, 2 router workers) equal the in-process
model's. One heavy party at a time (the CI machine has 24 GB like this one): the cluster is shut down, keeping only
its logits and tokens, before the in-process model is built. Also: the actors hold bf16 shards and no grad buffers,
and each one's load peak stays within 1.5x of what it holds."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
import yaml

from moe_runtime.checkpoint.run_config import resolve_checkpoint
from moe_runtime.checkpoint.synthetic import write_random_checkpoint
from moe_runtime.config import ModelConfig
from moe_runtime.generation.sampling import SamplingParams
from tests.checkpoint.official import rel_err

SLICE = Path(__file__).resolve().parents[2] / "cluster" / "yuan-m32-slice.yaml"
PROMPTS = [[5, 17, 42, 7], [100, 2000, 30000, 4, 99, 12345]]
LAYERS = 1
GREEDY = SamplingParams(4, temperature=0, ignore_eod=True)


@pytest.mark.slow
def test_real_width_slice_forward_and_generation_on_the_cluster_equal_in_process(ray_session, tmp_path) -> None:
    import ray

    from moe_runtime.checkpoint.in_process import load_model
    from moe_runtime.generation.backend import LocalBackend
    from moe_runtime.generation.engine import Engine
    from moe_runtime.runtime.cluster import Cluster

    data = yaml.safe_load(SLICE.read_text())
    model = ModelConfig(**data["model"])
    assert (model.hidden_size, model.num_heads, model.head_dim, model.rotary_dim, model.ffn_hidden_size,
            model.vocab_size, model.num_experts, model.num_layers) == (2048, 16, 256, 128, 8192, 135040, 32, 2)
    assert model.expert_weight_dtype == "bfloat16"
    data["model"]["num_layers"] = LAYERS
    model = ModelConfig(**data["model"])
    directory = write_random_checkpoint(tmp_path / "ck", model, dtype=torch.bfloat16, max_shard_bytes=1 << 30)
    cfg = resolve_checkpoint(data, str(SLICE), directory)
    assert (cfg.cluster.expert_actors, cfg.cluster.router_workers) == (4, 2)
    ids = torch.randint(0, model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with Cluster.start(cfg) as cluster:
        got = cluster.forward(ids)
        got_gen = [c.new_token_ids for c in cluster.generate(PROMPTS, GREEDY)]
        stats = ray.get([a.stats.remote() for a in cluster.experts])
        loaded = cluster.hf_load.totals()
    expert_bytes = LAYERS * 32 * 50_331_648 * 2  # bf16
    for i, st in enumerate(stats):
        assert st["num_shards"] == LAYERS * 32 // 4 and st["grad_buffers"] == 0  # forward / generation only: no grad buffer
        assert st["weight_bytes"] == expert_bytes // 4
        party = loaded[f"actor {i}"]
        assert party["held_bytes"] == expert_bytes // 4
        assert party["peak_delta"] < 1.5 * party["held_bytes"], party
    gc.collect()
    with torch.no_grad():
        local = load_model(directory, expert_weight_dtype="bfloat16").eval()
        assert local.layers[0].moe.dispatcher.experts.w1.dtype == torch.bfloat16
        want = local(ids).logits
        want_gen = [c.new_token_ids for c in Engine(LocalBackend(local)).generate(PROMPTS, GREEDY)]
    assert got.shape == want.shape == (2, 12, model.vocab_size)
    assert rel_err(got, want.double()) < 1e-4
    assert got_gen == want_gen and all(len(t) == 4 for t in got_gen)
