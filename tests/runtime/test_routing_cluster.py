"""Grouped, top-p and node-limited routing through the local cluster == the in-process oracle (losses, aux losses,
expert load token for token). Small: the tiny preset, 2 expert actors, 3 steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moe_runtime.config import parse_config
from tests.runtime.helpers import make_config

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


def routing_config(tmp: Path, model: dict, **cluster):
    data = make_config(tmp, train={"checkpoint_every": 0}, expert_actors=2, **cluster).model_dump(mode="json")
    data["model"].update(model)
    return parse_config(data)


def _oracle(cfg, placement=None):
    from moe_runtime.training import InProcessTrainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tr = InProcessTrainer(cfg)
        if placement is not None:
            tr.model.set_expert_nodes(placement)
        return tr.run(STEPS)
    finally:
        torch.set_num_threads(threads)


def assert_same_run(result, oracle) -> None:
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(oracle.losses), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(result.aux_losses), torch.tensor(oracle.aux_losses), rtol=1e-4,
                               atol=1e-7)
    assert result.expert_load == oracle.expert_load  # same routing, token for token
    torch.testing.assert_close(torch.tensor(result.val_loss), torch.tensor(oracle.val_loss), rtol=1e-4, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("model", [
    {"routing": "grouped", "routing_groups": 2},
    {"routing": "top_p", "top_p": 0.6, "k_max": 4, "dynamic_loss_coeff": 0.01, "aux_loss_coeff": 0.01},
], ids=["grouped", "top_p"])
def test_routing_on_the_cluster_matches_in_process(ray_session, runtime_tmp, model):
    from moe_runtime.runtime.cluster import Cluster

    cfg = routing_config(runtime_tmp, model)
    with Cluster.start(cfg) as c:
        result = c.train(STEPS, record_trace=runtime_tmp / f"{model['routing']}.npz")
    oracle = _oracle(cfg)
    assert_same_run(result, oracle)
    load = torch.tensor(result.expert_load)
    tokens = STEPS * cfg.train.batch_size * cfg.train.seq_len
    from moe_runtime.sim.traces import load_trace

    trace = load_trace(result.extra["trace"])
    if model["routing"] == "grouped":  # every group (= actor) the same copies: T*k/G per layer
        assert result.extra["actor_load"] == [tokens * 2 * 2 // 2] * 2
        assert (trace.counts[..., :4].sum(-1) == trace.counts[..., 4:].sum(-1)).all()  # every step, chunk, layer
        assert (trace.counts[..., :4].sum(-1) > 0).all()
    else:  # a variable number of copies, 1..k_max per token, recorded with the true token counts
        assert (load.sum(-1) >= tokens).all() and (load.sum(-1) <= 4 * tokens).all()
        assert not (load.sum(-1) == 2 * tokens).all()
        assert trace.top_k == 4 and int(trace.tokens().sum()) == tokens
        assert trace.load().tolist() == load.double().tolist()


NODE_LIMITED = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from tests.runtime.test_routing_cluster import routing_config
    from moe_runtime.runtime.cluster import Cluster
    # 2 simulated nodes, one expert actor on each (experts 0-3 on one node, 4-7 on the other); 1 node per token
    cfg = routing_config(Path({tmp!r}), {{"routing": "node_limited", "max_nodes": 1}}, num_nodes=2, num_gpus=2,
                         router_workers=1, placement_strategy="STRICT_SPREAD")
    cfg = cfg.model_copy(update={{"train": cfg.train.model_copy(update={{"micro_batches": 4}})}})
    with Cluster.start(cfg) as c:
        r = c.train({steps})
        print("RESULT " + json.dumps({{"result": json.loads(r.to_json()), "placement": c.placement.to_dict()}}))
""")


@pytest.mark.slow
def test_node_limited_on_two_simulated_nodes_matches_in_process(runtime_tmp):
    """Own Ray (2 raylets) in a subprocess, like test_cluster.test_two_simulated_nodes."""
    from moe_runtime.placement import Placement

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = NODE_LIMITED.format(root=str(ROOT), tmp=str(runtime_tmp / "nl"), steps=STEPS)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=280, env=env,
                          cwd=ROOT, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    placement = Placement.from_dict(out["placement"])
    assert sorted(placement.actor_nodes) == [0, 1]
    cfg = routing_config(runtime_tmp / "nl", {"routing": "node_limited", "max_nodes": 1}, num_nodes=2, num_gpus=2,
                         router_workers=1)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"micro_batches": 4})})
    oracle = _oracle(cfg, placement)

    class R:  # the subprocess's TrainResult fields
        losses, aux_losses = out["result"]["losses"], out["result"]["aux_losses"]
        expert_load, val_loss = out["result"]["expert_load"], out["result"]["val_loss"]

    assert_same_run(R, oracle)
    # node-limited with M = 1 on two nodes of 4 experts: differs from plain top-2 (which mixes the halves)
    top2 = _oracle(routing_config(runtime_tmp / "nl", {}, num_nodes=2, num_gpus=2, router_workers=1)
                   .model_copy(update={"train": cfg.train}))
    assert top2.expert_load != oracle.expert_load
