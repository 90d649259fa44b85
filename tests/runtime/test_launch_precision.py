"""launch.check_config refuses train.precision bf16 where parties would compute on the CPU, before Ray starts."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.config import parse_config


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's refusal")
def test_cluster_refuses_bf16_before_starting_anything():
    from moe_runtime.runtime.launch import check_config
    from moe_runtime.runtime.ray_env import ClusterStartError

    with pytest.raises(ClusterStartError, match=r"train.precision = 'bf16': expected 'fp32' here, every party would "
                                                 r"compute on the CPU"):
        check_config(parse_config({"train": {"precision": "bf16"}}))
    check_config(parse_config({"train": {"precision": "fp32"}}))  # the default passes
