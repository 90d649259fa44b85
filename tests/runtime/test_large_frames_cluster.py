"""Frames above the gRPC message limit through a real local cluster (issue 13): `transport.max_message_mb: 1` and a
batch whose expert frames are ~2 MiB each; every frame is split into chunks automatically (no chunk_mb set), both
ways, and training gives the in-process oracle's losses, aux losses and expert load."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.config import parse_config
from tests.runtime.helpers import make_config

STEPS = 2


@pytest.mark.slow
def test_frames_above_the_message_limit_train_like_the_oracle(ray_session, runtime_tmp):
    from moe_runtime.runtime.cluster import Cluster
    from moe_runtime.training import InProcessTrainer

    data = make_config(runtime_tmp / "large_frames", train={"batch_size": 64, "seq_len": 128, "micro_batches": 1,
                                                            "checkpoint_every": 0},
                       expert_actors=1).model_dump(mode="json")  # fmt: skip
    data["transport"]["max_message_mb"] = 1
    cfg = parse_config(data)
    m, t = cfg.model, cfg.train
    rows = t.batch_size // cfg.cluster.router_workers * t.seq_len * m.top_k  # one actor gets every copy
    assert rows * m.hidden_size * 4 >= 2 * (1 << 20)  # each Dispatch/Backward frame is ~2x the message limit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        oracle = InProcessTrainer(cfg)
        expected = [oracle.train_step(step) for step in range(STEPS)]
    finally:
        torch.set_num_threads(threads)
    with Cluster.start(cfg) as c:
        result = c.train(STEPS)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor([e[0] for e in expected]), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(result.aux_losses), torch.tensor([e[1] for e in expected]), rtol=1e-4,
                               atol=1e-7)  # fmt: skip
    assert result.expert_load == sum(e[2] for e in expected).tolist()
