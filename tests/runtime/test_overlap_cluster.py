"""transport.overlap = "two_batch" through the local Ray cluster == the in-process oracle: losses, aux losses and
expert load token for token (tiny preset, 2 router workers x 2 micro-batches of 2 rows, each split in two halves
that pipeline their expert exchanges; 2 expert actors), with frames above ~4 KB sent as chunked streams."""

from __future__ import annotations

import torch

from moe_runtime.config import parse_config
from tests.runtime.helpers import make_config

STEPS = 3


def test_two_batch_cluster_matches_oracle(ray_session, oracle, runtime_tmp):
    from moe_runtime.runtime.cluster import Cluster

    data = make_config(runtime_tmp / "two_batch", train={"checkpoint_every": 0},
                       expert_actors=2).model_dump(mode="json")  # fmt: skip
    data["transport"]["overlap"] = "two_batch"
    data["transport"]["chunk_mb"] = 0.004  # ~4 KB: most frames go as chunked streams (dispatch/chunks.py) too
    cfg = parse_config(data)
    with Cluster.start(cfg) as c:
        result = c.train(STEPS)
        stats = c.status()
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(oracle.losses[:STEPS]), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(result.aux_losses), torch.tensor(oracle.aux[:STEPS]), rtol=1e-4,
                               atol=1e-7)  # fmt: skip
    assert result.expert_load == sum(oracle.loads[:STEPS]).tolist()
    assert stats["healthy"]


def test_bad_overlap_names_the_field(runtime_tmp):
    import pytest

    from moe_runtime.config import ConfigError

    data = make_config(runtime_tmp / "bad_overlap").model_dump(mode="json")
    data["transport"]["overlap"] = "three_batch"
    with pytest.raises(ConfigError, match=r"transport\.overlap.*three_batch|three_batch.*transport\.overlap"):
        parse_config(data)
