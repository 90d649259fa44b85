"""The device rule (ComputeDevice.resolve) and its errors; train.precision in the config."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.config import ConfigError, parse_config
from moe_runtime.model.device import ComputeDevice, host_copy


def test_auto_is_cuda_only_when_visible():
    d = ComputeDevice.resolve()
    assert d.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert d.dtype == torch.float32 and not d.mixed


def test_cpu_fp32_is_a_no_op_autocast():
    d = ComputeDevice.resolve("cpu", "fp32")
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    with d.autocast():
        y = x @ w
    assert y.dtype == torch.float32 and torch.equal(y, x @ w)
    assert str(d) == "cpu"


def test_bf16_on_cpu_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"train.precision = 'bf16' on the CPU: expected 'fp32'"):
        ComputeDevice.resolve("cpu", "bf16")


@pytest.mark.parametrize(("device", "precision", "message"), [
    ("cpu", "fp16", r"train.precision = 'fp16': expected one of \['fp32', 'bf16'\]"),
    ("tpu", "fp32", r"device = 'tpu': expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("meta", "fp32", r"device = 'meta': expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
])  # fmt: skip
def test_bad_device_or_precision(device, precision, message):
    with pytest.raises(ValueError, match=message):
        ComputeDevice.resolve(device, precision)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a CUDA device")
def test_cuda_without_a_device_says_so():
    with pytest.raises(ValueError, match=r"device = 'cuda': no CUDA device is visible to this process"):
        ComputeDevice.resolve("cuda")


def test_host_copy_is_an_independent_clone_on_cpu():
    t = torch.randn(3, 2)
    c = host_copy(t)
    assert torch.equal(c, t) and c.data_ptr() != t.data_ptr() and c.device.type == "cpu"


def test_precision_config_field():
    assert parse_config({}).train.precision == "fp32"
    assert parse_config({"train": {"precision": "bf16"}}).train.precision == "bf16"  # refused later, per device
    with pytest.raises(ConfigError, match="precision"):
        parse_config({"train": {"precision": "fp16"}})


def test_router_worker_gpus_count_toward_num_gpus():
    cfg = {"cluster": {"num_gpus": 2, "expert_actors": 2, "gpus_per_expert_actor": 0.5, "router_workers": 2,
                       "gpus_per_router_worker": 0.5}}  # fmt: skip
    assert parse_config(cfg).cluster.gpus_per_router_worker == 0.5
    cfg["cluster"]["gpus_per_router_worker"] = 1.0
    with pytest.raises(ConfigError, match=r"gpus_per_router_worker = 1: expert actors and router workers need 3 GPUs "
                                          r"but num_gpus = 2"):
        parse_config(cfg)
