"""data.source: files through the local cluster == the in-process oracle: packed documents, attention and
positions restarting after <eod> (the router workers pass the document ids), losses, aux losses, expert load and
the validation loss. Small: the tiny preset, a few text / jsonl files written here, 2 expert actors, 3 steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_runtime.config import parse_config
from tests.runtime.helpers import make_config

STEPS = 3


def files_config(tmp: Path):
    data_dir = tmp / "files-data"
    data_dir.mkdir(exist_ok=True)
    for i in range(4):
        (data_dir / f"doc{i}.txt").write_text(f"document {i}: " + "lorem ipsum dolor sit amet " * (3 + i))
    (data_dir / "more.jsonl").write_text("\n".join(json.dumps({"text": f"short note {j} " * (j + 1)})
                                                   for j in range(12)) + "\n")
    data = make_config(tmp, train={"checkpoint_every": 0, "val_batches": 2}, expert_actors=2).model_dump(mode="json")
    data["data"] = {"source": "files", "paths": [str(data_dir / "*.txt"), str(data_dir / "*.jsonl")],
                    "val_fraction": 0.3, "reset_positions": True}
    return parse_config(data)


def _oracle(cfg):
    from moe_runtime.training import InProcessTrainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return InProcessTrainer(cfg).run(STEPS)
    finally:
        torch.set_num_threads(threads)


def assert_train_matches_oracle(result, cfg):
    """The cluster's losses, aux losses and expert load equal the in-process run's; returns the oracle's result."""
    oracle = _oracle(cfg)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(oracle.losses), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(result.aux_losses), torch.tensor(oracle.aux_losses), rtol=1e-4,
                               atol=1e-7)  # fmt: skip
    assert result.expert_load == oracle.expert_load  # same routing, token for token
    return oracle


@pytest.mark.slow
def test_files_on_the_cluster_match_in_process(ray_session, runtime_tmp):
    from moe_runtime.runtime.cluster import Cluster

    cfg = files_config(runtime_tmp)
    with Cluster.start(cfg) as c:
        result = c.train(STEPS)
    oracle = assert_train_matches_oracle(result, cfg)
    torch.testing.assert_close(torch.tensor(result.val_loss), torch.tensor(oracle.val_loss), rtol=1e-4, atol=0)
    unmasked = cfg.model_copy(update={"data": cfg.data.model_copy(update={"reset_positions": False})})
    assert _oracle(unmasked).losses != oracle.losses  # the positions reached the model: the check can fail
