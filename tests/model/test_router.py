"""The Attention Router against an independent, loop-based transcription of the official math."""

import math

import torch
from torch.testing import assert_close

from moe_runtime.model.router import AttentionRouter, LinearRouter, switch_load_balancing_loss


def reference_attention_router(x_td, wq, wk, wv, k):
    """Per token, per (i, j): the formulas of yuan-m32.md written out with Python loops, in float64."""
    ids, gates, all_logits = [], [], []
    for x in x_td.double():
        q = [float(wq[i].double() @ x) for i in range(wq.shape[0])]
        kk = [float(wk[i].double() @ x) for i in range(wk.shape[0])]
        v = [float(wv[i].double() @ x) for i in range(wv.shape[0])]
        n = len(q)
        logits = []
        for i in range(n):
            row = [q[i] * kk[j] for j in range(n)]
            m = max(row)
            ex = [math.exp(a - m) for a in row]
            s = sum(ex)
            logits.append(sum(ex[j] / s * v[j] for j in range(n)))
        top = sorted(range(n), key=lambda e: -logits[e])[:k]
        z = [math.exp(logits[e] - logits[top[0]]) for e in top]
        ids.append(top)
        gates.append([a / sum(z) for a in z])
        all_logits.append(logits)
    return torch.tensor(ids), torch.tensor(gates, dtype=torch.float64), torch.tensor(all_logits, dtype=torch.float64)


def test_attention_router_matches_loop_transcription():
    torch.manual_seed(0)
    d, num_experts, k = 24, 8, 2
    router = AttentionRouter(d, num_experts, k, init_std=0.5)  # large weights: sharp, untied routing
    x = torch.randn(40, d)
    out = router(x)
    wq, wk, wv = router.wqkv.detach().chunk(3, dim=0)
    ids, gates, logits = reference_attention_router(x, wq, wk, wv, k)
    assert_close(router.logits(x).double(), logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.expert_ids, ids)
    assert_close(out.weights.double(), gates, rtol=1e-5, atol=1e-6)
    assert_close(out.weights.sum(-1), torch.ones(40))
    assert (out.weights[:, 0] >= out.weights[:, 1]).all()  # descending gate order
    assert out.probs.dtype == torch.float32 and out.probs.shape == (40, num_experts)


def test_attention_router_parameter_count_is_3Ed():
    assert sum(p.numel() for p in AttentionRouter(2048, 32, 2).parameters()) == 196_608


def test_attention_router_computes_in_fp32_for_low_precision_input():
    torch.manual_seed(1)
    router = AttentionRouter(16, 4, 2, init_std=0.5)
    x = torch.randn(8, 16)
    out32 = router(x)
    out16 = router(x.to(torch.bfloat16))
    assert out16.weights.dtype == torch.bfloat16
    assert out16.probs.dtype == torch.float32
    # bf16 input rounding only: routing of well-separated logits is unchanged
    assert (out16.expert_ids == out32.expert_ids).float().mean() > 0.8


def test_linear_router_and_gates_equal_renormalised_full_softmax():
    torch.manual_seed(2)
    router = LinearRouter(16, 6, 2, init_std=0.3)
    x = torch.randn(30, 16)
    out = router(x)
    full = torch.softmax(x @ router.weight.t(), -1)
    top, ids = full.topk(2, -1)
    assert torch.equal(out.expert_ids, ids)
    assert_close(out.weights, top / top.sum(-1, keepdim=True))


def test_switch_aux_loss_formula_and_gradient():
    torch.manual_seed(3)
    router = LinearRouter(16, 4, 2, aux_loss_coeff=0.01, init_std=0.3)
    x = torch.randn(50, 16)
    out = router(x)
    p = torch.softmax(x @ router.weight.t(), -1)
    chosen = torch.zeros(50, 4)
    for t in range(50):
        chosen[t, out.expert_ids[t]] = 1
    expected = 0.01 * 4 * sum(p[:, e].mean() * chosen[:, e].mean() / 2 for e in range(4))
    assert_close(out.aux_loss, expected)
    out.aux_loss.backward()
    assert router.weight.grad.abs().sum() > 0
    assert switch_load_balancing_loss(p, out.expert_ids, 0.0).item() == 0.0


def test_attention_router_inference_logits_bit_identical_to_training_logits():
    torch.manual_seed(3)
    router = AttentionRouter(32, 8, 2)
    for tokens in (1, 8, 300):
        x = torch.randn(tokens, 32)
        with torch.no_grad():
            fast = router.logits(x)
        assert torch.equal(fast, router.logits(x).detach())
