"""Traces with a variable number of copies per token (top-p routing): recorded from masked ids and plans, saved and
loaded in both formats, and replayed by the simulator with the true token counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_runtime.config import RuntimeConfig
from moe_runtime.model.transformer import build_model
from moe_runtime.sim.simulator import Simulator
from moe_runtime.sim.traces import RoutingTrace, TraceError, TraceRecorder, load_trace


def test_masked_ids_count_real_copies_and_tokens(tmp_path):
    rec = TraceRecorder(1, 4, 3)
    ids = np.array([[1, 3, 3], [0, 0, 0], [2, 0, 1]])
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=bool)
    rec.record(0, 0, 0, expert_ids=ids, mask=mask)
    trace = rec.trace()
    assert trace.counts[0, 0, 0].tolist() == [2, 2, 1, 1] and trace.tokens().tolist() == [[3]]
    assert trace.copies_per_token() == pytest.approx(2.0)
    for suffix in (".npz", ".jsonl"):
        back = load_trace(trace.save(tmp_path / f"t{suffix}"))
        assert back == trace and back.tokens().tolist() == [[3]]


def test_jsonl_rows_of_different_lengths(tmp_path):
    import json

    path = tmp_path / "v.jsonl"
    lines = [{"format": "moe-runtime-trace", "version": 1, "top_k": 3, "num_layers": 1, "num_experts": 4},
             {"step": 0, "chunk": 0, "layer": 0, "expert_ids": [[1, 3], [0], [2, 0, 1]], "tokens": 3}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    trace = load_trace(path)
    assert trace.counts[0, 0, 0].tolist() == [2, 2, 1, 1] and trace.tokens().tolist() == [[3]]


def test_token_counts_must_fit_the_copies():
    with pytest.raises(TraceError, match="a token makes at most top_k = 2 copies"):
        RoutingTrace(np.full((1, 1, 1, 4), 5), 2, token_counts=np.array([[3]]))
    with pytest.raises(TraceError, match=r"token_counts has shape \(2,\)"):
        RoutingTrace(np.ones((1, 1, 1, 4)), 2, token_counts=np.array([1, 1]))


def test_recorded_top_p_plans_replay_with_their_tokens():
    cfg = RuntimeConfig.model_validate({"model": {"preset": "tiny", "routing": "top_p", "top_p": 0.6, "k_max": 4},
                                        "cluster": {"router_workers": 1, "expert_actors": 4}})
    model = build_model(cfg.model, seed=0)
    rec = TraceRecorder(cfg.model.num_layers, cfg.model.num_experts, cfg.model.max_copies_per_token)
    with torch.no_grad():
        model(torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(0)))
    rec.record_plans(0, 0, [m.last_plan for m in model.moe_layers])
    trace = rec.trace()
    assert trace.tokens().tolist() == [[64]]
    copies = trace.counts[0, 0].sum(-1)
    assert (copies >= 64).all() and (copies <= 4 * 64).all() and not (copies == 2 * 64).all()
    sim = Simulator.from_config(cfg)
    sim.check_trace(trace)
    got = sim.run(trace)[0]
    assert got.step_time_s == sim.run_step(trace.step(0), tokens_c=np.array([64])).step_time_s
    fixed = sim.run_step(trace.step(0))  # tokens inferred as copies / k_max: not the 64 that ran
    assert got.step_time_s != fixed.step_time_s
