"""moe_runtime/adamw.py against torch.optim.AdamW(foreach=False): the same parameters, grads, groups and lr
schedule give bit-identical weights and state, and it never imports torch._dynamo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_runtime.adamw import AdamW
from moe_runtime.config import TrainConfig
from moe_runtime.training import make_adamw, param_groups, set_lr

ROOT = Path(__file__).resolve().parents[1]


def _params(seed: int) -> list[tuple[str, torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (6, 5), "norm": (5,), "bias": (3,), "experts": (2, 4, 3)}
    return [(n, torch.nn.Parameter(torch.randn(*s, generator=g))) for n, s in shapes.items()]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_torch_adamw_bit_for_bit(weight_decay):
    ours, theirs = _params(0), _params(0)
    opt = AdamW(param_groups(ours, weight_decay), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW(param_groups(theirs, weight_decay), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        lr = 3e-3 * (step + 1) / 6
        set_lr(opt, lr)
        set_lr(ref, lr)
        for i, ((_, p), (_, q)) in enumerate(zip(ours, theirs)):
            if step == 2 and i == 1:  # a parameter without a grad this step is skipped, its state kept
                continue
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        opt.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        for (n, p), (_, q) in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"{n} after step {step}")
            assert p.grad is None
    for (_, p), (_, q) in zip(ours, theirs):
        for f in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][f], ref.state[q][f], rtol=0, atol=0)
            assert opt.state[p][f].dtype == ref.state[q][f].dtype and opt.state[p][f].device == ref.state[q][f].device


def test_make_adamw_uses_the_train_config():
    cfg = TrainConfig(lr=2e-3, betas=(0.9, 0.9), weight_decay=0.05)
    opt = make_adamw(_params(0), cfg)
    assert [(g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in opt.param_groups] == [
        (2e-3, (0.9, 0.9), 1e-8, 0.05), (2e-3, (0.9, 0.9), 1e-8, 0.0)]
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]  # matrices decay; norms and biases do not


def test_bad_uses_are_refused():
    with pytest.raises(ValueError, match="leaf tensor"):
        AdamW([{"params": [torch.ones(2, requires_grad=True) * 2]}], lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    opt = AdamW([{"params": [torch.nn.Parameter(torch.ones(2))]}], lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    with pytest.raises(ValueError, match="set_to_none"):
        opt.zero_grad(set_to_none=False)


def test_never_imports_dynamo():
    code = ("import sys, torch\nfrom moe_runtime.adamw import AdamW\n"
            "p = torch.nn.Parameter(torch.ones(3))\nopt = AdamW([{'params': [p]}], lr=1e-3, betas=(0.9, 0.99), eps=1e-8)\n"
            "p.grad = torch.ones(3)\nopt.step()\nopt.zero_grad()\nprint('torch._dynamo' in sys.modules, float(p[0]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    dynamo, first = out.stdout.split()
    assert dynamo == "False" and float(first) < 1.0  # it stepped
