"""Routing traces: synthetic generators, recording from a real model, files, replay."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe_runtime.config import ModelConfig
from moe_runtime.model.transformer import build_model
from moe_runtime.sim.traces import (
    RoutingTrace,
    TraceError,
    TraceRecorder,
    load_trace,
    synthetic_trace,
    zipf_shares,
)

KW = {"steps": 3, "workers": 2, "layers": 3, "experts": 16, "top_k": 2, "tokens_per_worker": 512}


@pytest.mark.parametrize("kind", ["uniform", "zipf", "drift"])
def test_synthetic_is_deterministic_and_conserves_copies(kind):
    a = synthetic_trace(kind, seed=7, zipf_s=1.2, **KW)
    b = synthetic_trace(kind, seed=7, zipf_s=1.2, **KW)
    c = synthetic_trace(kind, seed=8, zipf_s=1.2, **KW)
    assert a == b and a != c
    assert a.counts.shape == (3, 2, 3, 16)
    assert (a.counts.sum(-1) == 512 * 2).all()  # every chunk and layer: tokens x k copies
    assert (a.tokens() == 512).all()
    longer = synthetic_trace(kind, seed=7, zipf_s=1.2, **{**KW, "steps": 5})
    assert np.array_equal(longer.counts[:3], a.counts)  # step s depends only on (seed, s)


def test_zipf_shares_rank_order_and_cap():
    p = zipf_shares(8, 2.0, top_k=2)
    assert np.isclose(p.sum(), 1.0)
    assert (np.diff(p) <= 1e-12).all()
    assert p.max() <= 0.5 + 1e-12  # a token picks an expert at most once: at most 1/k of the copies
    assert np.allclose(zipf_shares(8, 0.0), 1 / 8)


def test_zipf_hot_experts_differ_per_layer_and_skew_grows_with_s():
    t1 = synthetic_trace("zipf", seed=0, zipf_s=1.0, **{**KW, "tokens_per_worker": 20000})
    load = t1.load()
    assert len(set(load.argmax(axis=1).tolist())) > 1  # a seeded permutation per layer
    t2 = synthetic_trace("zipf", seed=0, zipf_s=2.0, **{**KW, "tokens_per_worker": 20000})
    assert (t2.load().max(axis=1) > load.max(axis=1)).all()


def test_drift_moves_the_hot_set():
    t = synthetic_trace("drift", seed=0, hot_experts=2, hot_fraction=0.6, drift_per_step=2,
                        **{**KW, "steps": 6, "tokens_per_worker": 20000})  # fmt: skip
    hot = [set(np.argsort(t.load([s])[0])[-2:].tolist()) for s in range(6)]
    assert all(hot[s] != hot[s + 1] for s in range(5))
    share = np.sort(t.load([0])[0])[-2:].sum() / t.load([0])[0].sum()
    assert 0.55 < share < 0.65


def test_record_from_model_save_load_roundtrip(tmp_path):
    cfg = ModelConfig(preset="tiny")
    model = build_model(cfg, seed=0)
    rec = TraceRecorder(cfg.num_layers, cfg.num_experts, cfg.top_k, micro_batches=1, meta={"model": "tiny"})
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        for chunk in range(2):
            with torch.no_grad():
                model(torch.randint(0, cfg.vocab_size, (2, 16), generator=g))
            if chunk == 0:
                rec.record_layers(step, chunk, model.expert_load())
            else:
                rec.record_plans(step, chunk, [m.last_plan for m in model.moe_layers])
    trace = rec.trace()
    assert trace.counts.shape == (2, 2, cfg.num_layers, cfg.num_experts)
    assert (trace.tokens() == 32).all()
    for suffix in (".npz", ".jsonl"):
        path = trace.save(tmp_path / f"t{suffix}")
        back = load_trace(path)
        assert back == trace and back.meta["model"] == "tiny"


def test_jsonl_accepts_expert_ids_and_missing_records(tmp_path):
    path = tmp_path / "ids.jsonl"
    lines = [
        {"format": "moe-runtime-trace", "version": 1, "top_k": 2, "num_layers": 1, "num_experts": 4},
        {"step": 0, "chunk": 1, "layer": 0, "expert_ids": [[0, 1], [0, 3], [2, 0]]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    t = load_trace(path)
    assert t.counts.shape == (1, 2, 1, 4)
    assert t.counts[0, 1, 0].tolist() == [3, 1, 1, 1]
    assert t.counts[0, 0].sum() == 0  # chunk 0 was not recorded


def test_bad_inputs_are_named():
    with pytest.raises(TraceError, match="top_k"):
        RoutingTrace(np.zeros((1, 1, 1, 4), dtype=int), top_k=5)
    with pytest.raises(TraceError, match="micro_batches"):
        RoutingTrace(np.zeros((1, 3, 1, 4), dtype=int), top_k=2, micro_batches=2)
    rec = TraceRecorder(2, 4, 2)
    with pytest.raises(TraceError, match="out of range"):
        rec.record(0, 0, 0, expert_ids=[[0, 4]])
    with pytest.raises(TraceError, match="does not exist"):
        load_trace("/nonexistent/trace.npz")
