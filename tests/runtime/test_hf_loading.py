"""An HF checkpoint on the cluster (runtime/hf_loading.py): every party reads only its own tensors, logits equal the
independent float64 transcription of the official forward, training from it equals in-process training from it,
and the streamed export reproduces the checkpoint bit for bit. A bad checkpoint fails before Ray is touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_runtime.checkpoint.hf_config import CheckpointError
from moe_runtime.checkpoint.hf_layout import hf_expert_names
from moe_runtime.checkpoint.hf_reader import HFCheckpoint
from moe_runtime.checkpoint.in_process import load_model, load_state
from moe_runtime.checkpoint.run_config import run_overrides
from tests.checkpoint.official import official_forward, rel_err
from tests.runtime.hf_fixtures import cluster_config, make_checkpoint

TOL = 1e-4


def _stored(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def hf_ck(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("hf") / "ck", dtype=torch.bfloat16, shards=3)


@pytest.fixture(scope="module")
def hf_cluster(ray_session, hf_ck, tmp_path_factory):
    from moe_runtime.runtime.cluster import Cluster

    c = Cluster.start(cluster_config(hf_ck[0], tmp_path_factory.mktemp("hfrun")))
    yield c
    c.shutdown()


def test_cluster_logits_equal_the_official_forward(hf_cluster, hf_ck) -> None:
    directory, cfg, weights = hf_ck
    ids = torch.randint(0, 77, (2, 12), generator=torch.Generator().manual_seed(1))  # no eod: no reset masks
    want, gap = official_forward(cfg, weights, ids)
    assert gap > 1e-5
    got = hf_cluster.forward(ids)
    assert rel_err(got, want) < TOL
    with torch.no_grad():
        local = load_model(directory)(ids).logits
    assert rel_err(got, local.double()) < 1e-5  # the cluster's fp32 against the in-process fp32


def test_each_party_read_only_its_own_tensors(hf_cluster, hf_ck) -> None:
    report = hf_cluster.hf_load
    totals = report.totals()
    placement = hf_cluster.placement
    ck = HFCheckpoint(hf_ck[0])
    for i in range(len(hf_cluster.experts)):
        mine = sorted(placement.shards_of(i))
        t = totals[f"actor {i}"]
        assert t["keys"] == mine and t["tensors"] == 2 * len(mine)
        assert t["disk_bytes"] == ck.expert_nbytes(mine)
        assert t["held_bytes"] == 2 * t["disk_bytes"]  # bf16 on disk, fp32 held
    for w in range(len(hf_cluster.workers)):
        t = totals[f"worker {w}"]
        assert t["keys"] == [] and t["disk_bytes"] == ck.dense_nbytes()
    assert sum(len(t["keys"]) for t in totals.values()) == 2 * 4  # every (layer, expert) once
    assert "actor 0" in report.describe() and "driver" in report.describe()


def test_export_reproduces_the_checkpoint_bit_for_bit(hf_cluster, hf_ck, tmp_path) -> None:
    directory, cfg, weights = hf_ck
    rep = hf_cluster.save_hf(tmp_path / "out", max_shard_bytes=40_000)  # several shards
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 1
    got, want = _stored(out), {k: v for k, v in weights.items() if k != "lm_head.weight"}
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name].view(torch.int16), t.view(torch.int16)), name
    saved = json.loads((out / "config.json").read_text())
    assert {k: saved[k] for k in cfg if k != "torch_dtype"} == {k: cfg[k] for k in cfg if k != "torch_dtype"}
    assert (out / "tokenizer.model").read_bytes() == (directory / "tokenizer.model").read_bytes()
    parts = rep["parties"]
    assert sorted(parts) == ["actor 0", "actor 1", "worker 0"]
    # import the export again: the same model
    again = HFCheckpoint(out)
    for name, t in again.read_hf(list(want)).items():
        assert torch.equal(t, want[name].float()), name


def test_training_from_the_checkpoint_equals_in_process(hf_cluster, hf_ck, tmp_path) -> None:
    from moe_runtime.training import InProcessTrainer

    cfg = hf_cluster.cfg
    trainer = InProcessTrainer(cfg)
    load_state(trainer.model, HFCheckpoint(hf_ck[0], **run_overrides(cfg.model)))
    want = [trainer.train_step(s)[0] for s in range(2)]
    got = [hf_cluster.train_step(s).loss for s in range(2)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    # the streamed export (fp32) holds exactly the trained weights of every party
    hf_cluster.save_hf(tmp_path / "trained", dtype=torch.float32)
    stored = _stored(tmp_path / "trained")
    sd = trainer.model.state_dict()
    for layer in range(cfg.model.num_layers):
        for e in range(cfg.model.num_experts):
            w1, w2 = hf_expert_names(layer, e)
            torch.testing.assert_close(stored[w1], sd[f"layers.{layer}.moe.dispatcher.experts.w1"][e].t(),
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(stored[w2], sd[f"layers.{layer}.moe.dispatcher.experts.w2"][e].t(),
                                       rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stored["model.embed_tokens.weight"], sd["embed.weight"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("damage", ["missing_shard", "wrong_shape", "missing_tensor"])
def test_a_bad_checkpoint_fails_before_ray_starts(tmp_path, monkeypatch, damage) -> None:
    from moe_runtime.runtime import launch as launch_mod

    directory, _, weights = make_checkpoint(tmp_path / "ck", shards=3, tokenizer=False)
    cfg = cluster_config(directory, tmp_path)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    name = hf_expert_names(1, 2)[0]
    shard = directory / index["weight_map"][name]
    if damage == "missing_shard":
        shard.unlink()
        expect = [shard.name, "missing shard file"]
    else:
        from safetensors.torch import save_file

        held = load_file(str(shard))
        if damage == "wrong_shape":
            held[name] = held[name][:-1].contiguous()
            expect = [name, shard.name, "has shape"]
        else:
            del held[name]
            expect = [name, shard.name, "does not contain it"]
        save_file(held, str(shard), metadata={"format": "pt"})

    def no_ray(*a, **k):
        raise AssertionError("Ray was started for a bad checkpoint")

    monkeypatch.setattr(launch_mod, "start_ray", no_ray)
    with pytest.raises(CheckpointError) as info:
        launch_mod.launch(cfg)
    for piece in expect:
        assert piece in str(info.value)
