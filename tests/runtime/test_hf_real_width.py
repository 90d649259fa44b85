"""The real-width slice (cluster/yuan-m32-slice.yaml: hidden 2048, 16 heads x 256, RoPE on 128, ffn 8192, vocab
135040) from a random-weight checkpoint written to tmp in bf16: logits through the cluster (4 expert actors,
2 router workers, fp32 compute) equal the in-process model's. 2 layers of 4 experts so that it fits next to the
other tests (the yaml's 32 experts hold 12.9 GB of expert state per layer); one heavy party at a time: the cluster
is shut down before the in-process model is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from moe_runtime.checkpoint.run_config import resolve_checkpoint
from moe_runtime.checkpoint.synthetic import write_random_checkpoint
from moe_runtime.config import ModelConfig
from tests.checkpoint.official import rel_err

SLICE = Path(__file__).resolve().parents[2] / "cluster" / "yuan-m32-slice.yaml"


@pytest.mark.slow
def test_real_width_forward_on_the_cluster_equals_in_process(ray_session, tmp_path) -> None:
    from moe_runtime.checkpoint.in_process import load_model
    from moe_runtime.runtime.cluster import Cluster

    data = yaml.safe_load(SLICE.read_text())
    data["model"].update(num_layers=2, num_experts=4)
    model = ModelConfig(**data["model"])
    assert (model.hidden_size, model.num_heads, model.head_dim, model.rotary_dim, model.ffn_hidden_size,
            model.vocab_size) == (2048, 16, 256, 128, 8192, 135040)
    directory = write_random_checkpoint(tmp_path / "ck", model, dtype=torch.bfloat16, max_shard_bytes=512 << 20)
    cfg = resolve_checkpoint(data, str(SLICE), directory)
    assert (cfg.cluster.expert_actors, cfg.cluster.router_workers) == (4, 2)
    ids = torch.randint(0, model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with Cluster.start(cfg) as cluster:
        got = cluster.forward(ids)
        loaded = cluster.hf_load.totals()
    assert sorted(len(loaded[f"actor {i}"]["keys"]) for i in range(4)) == [2, 2, 2, 2]
    with torch.no_grad():
        want = load_model(directory).eval()(ids).logits
    assert got.shape == want.shape == (2, 24, model.vocab_size)
    assert rel_err(got, want.double()) < 1e-4
