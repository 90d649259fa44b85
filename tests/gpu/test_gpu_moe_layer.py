"""The MoE layer and the whole model on CUDA against the same weights on the CPU: forward and backward."""

from __future__ import annotations

import copy

import torch
from torch.testing import assert_close

from moe_runtime.config import ModelConfig
from moe_runtime.model.device import ComputeDevice
from moe_runtime.model.experts import SwiGLUExperts
from moe_runtime.model.moe_layer import LocalDispatcher, MoELayer, StepContext
from moe_runtime.model.router import AttentionRouter
from moe_runtime.model.transformer import build_model
from moe_runtime.placement import Placement
from tests.gpu.gpu_marks import gpu_only

E, D, FF, K = 8, 32, 64, 2


def _layer() -> MoELayer:
    torch.manual_seed(0)
    router = AttentionRouter(D, E, K, init_std=0.5)
    experts = SwiGLUExperts(E, D, FF, init_std=0.2)
    return MoELayer(router, LocalDispatcher(experts, Placement.contiguous(1, E, 2), num_layers=1), layer_index=0)


@gpu_only
def test_moe_layer_cuda_matches_cpu_forward_backward():
    cpu = _layer()
    gpu = copy.deepcopy(cpu).to("cuda")
    x = torch.randn(2, 48, D)
    g = torch.randn(2, 48, D)
    x_cpu, x_gpu = x.clone().requires_grad_(), x.cuda().requires_grad_()
    y_cpu, aux_cpu = cpu(x_cpu)
    y_gpu, aux_gpu = gpu(x_gpu)
    assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    assert_close(aux_gpu.cpu(), aux_cpu, rtol=1e-4, atol=1e-6)
    (y_cpu * g).sum().backward()
    (y_gpu * g.cuda()).sum().backward()
    assert_close(x_gpu.grad.cpu(), x_cpu.grad, rtol=1e-4, atol=1e-5)
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        assert p_gpu.grad is not None and p_gpu.grad.is_cuda, name
        assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-4, atol=1e-5, msg=name)


def _model_loss(model, device: str, vocab: int, autocast: ComputeDevice | None = None):
    torch.manual_seed(1)
    tokens = torch.randint(0, vocab, (2, 16))
    inputs, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    ctx = autocast.autocast() if autocast is not None else torch.autocast(device, enabled=False)
    with ctx:
        loss, ce = model.loss(inputs, targets, StepContext(0))
    loss.backward()
    return loss.detach().float().cpu(), {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()
                                         if p.grad is not None}  # fmt: skip


@gpu_only
def test_tiny_model_cuda_matches_cpu_loss_and_grads():
    cfg = ModelConfig(preset="tiny")
    cpu = build_model(cfg, 0)
    gpu = copy.deepcopy(cpu).to("cuda")
    loss_cpu, g_cpu = _model_loss(cpu, "cpu", cfg.vocab_size)
    loss_gpu, g_gpu = _model_loss(gpu, "cuda", cfg.vocab_size)
    assert_close(loss_gpu, loss_cpu, rtol=1e-4, atol=1e-6)
    assert set(g_gpu) == set(g_cpu)
    for n in g_cpu:
        assert_close(g_gpu[n], g_cpu[n], rtol=1e-3, atol=1e-5, msg=n)


@gpu_only
def test_tiny_model_bf16_autocast_near_fp32():
    """bf16 compute (fp32 master weights): the loss within bf16 rounding of the fp32 CPU loss, grads fp32."""
    cfg = ModelConfig(preset="tiny")
    cpu = build_model(cfg, 0)
    gpu = copy.deepcopy(cpu).to("cuda")
    loss_cpu, _ = _model_loss(cpu, "cpu", cfg.vocab_size)
    loss_gpu, g_gpu = _model_loss(gpu, "cuda", cfg.vocab_size, ComputeDevice.resolve("cuda", "bf16"))
    assert_close(loss_gpu, loss_cpu, rtol=2e-2, atol=1e-3)
    assert all(p.dtype == torch.float32 for p in gpu.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in gpu.parameters())
    assert g_gpu
