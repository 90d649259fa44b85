"""transport.overlap = "two_batch" with data.source: files (packed documents, attention and positions restarting
after <eod>) through the local cluster == the in-process oracle: each half gets its rows' document masks. Small:
the tiny preset, the files of test_data_files_cluster.py, 2 expert actors, 3 steps."""

from __future__ import annotations

import pytest

from moe_runtime.config import parse_config
from tests.runtime.test_data_files_cluster import STEPS, assert_train_matches_oracle, files_config


@pytest.mark.slow
def test_two_batch_with_files_matches_in_process(ray_session, runtime_tmp):
    from moe_runtime.runtime.cluster import Cluster

    data = files_config(runtime_tmp).model_dump(mode="json")
    data["transport"]["overlap"] = "two_batch"
    cfg = parse_config(data)
    with Cluster.start(cfg) as c:
        result = c.train(STEPS)
    assert_train_matches_oracle(result, cfg)
