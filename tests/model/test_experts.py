"""grouped_swiglu and its paths (loop, fused loop, padded) against a per-token reference: outputs and gradients
(x, w1, w2) in fp32, with replicas (repeated weight_index), zero-count segments, unsorted expert order and empty
input; the selection rule (padded without padding waste, else the fused loop); the fused loop's chunks, its
determinism and partial gradients; the no-autograd forward / hand-written backward the expert server runs, against
autograd."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from moe_runtime.model.experts import (
    SwiGLUExperts,
    grouped_swiglu,
    grouped_swiglu_backward,
    fused_chunks,
    fused_forward_wins,
    grouped_swiglu_forward_saving,
    grouped_swiglu_fused,
    grouped_swiglu_loop,
    grouped_mm_offsets,
    grouped_swiglu_padded,
    padded_is_faster,
    path_rule,
    swiglu,
    swiglu_backward,
    swiglu_forward_saving,
)

PATHS = {
    "auto": grouped_swiglu,
    "loop": grouped_swiglu_loop,
    "padded": grouped_swiglu_padded,
    "fused": grouped_swiglu_fused,
}


def per_token_reference(x_nd, counts, w1, w2, weight_index):
    """Every row on its own: find its segment's expert, x @ w1[e], SiLU on the first half times the second, @ w2."""
    index = range(len(counts)) if weight_index is None else weight_index
    expert_of_row = [e for e, n in zip(index, counts) for _ in range(n)]
    rows = []
    for r, e in enumerate(expert_of_row):
        h = x_nd[r] @ w1[e]
        f = h.shape[0] // 2
        rows.append((F.silu(h[:f]) * h[f:]) @ w2[e])
    return torch.stack(rows) if rows else x_nd.new_zeros(0, w2.shape[-1])


CASES = {
    # name: (num_experts, counts, weight_index)
    "identity": (4, [3, 1, 5, 2], None),
    "zero_counts": (5, [0, 4, 0, 3, 0], None),
    "replicas": (4, [2, 3, 1, 4, 2], [1, 3, 1, 0, 3]),  # experts 1 and 3 twice, not adjacent; expert 2 unused
    "replicas_zero": (3, [0, 2, 3, 0, 1], [2, 2, 0, 1, 0]),
    # 3 of 16 experts, spread over a wide range: the padded path gathers their weights instead of a view
    "sparse_subset": (16, [3, 2, 4], [13, 1, 7]),
    # 72 rows per expert, padding 3 * 96 / 216 = 1.33: the one case where "auto" takes the loop by rule
    "many_rows": (3, [80, 96, 40], None),
    "one_segment": (3, [6], [2]),
    "skewed": (6, [1, 17, 2, 0, 3, 1], None),
    # > FUSED_CHUNK_ROWS rows: the fused loop splits it into chunks, expert 0's two segments land in different ones
    "replicas_across_chunks": (3, [100, 60, 0, 90], [0, 1, 2, 0]),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_path_matches_per_token_reference(path, case):
    num_experts, counts, weight_index = CASES[case]
    d, ffn = 8, 12
    gen = torch.Generator().manual_seed(sorted(CASES).index(case))
    x = torch.randn(sum(counts), d, generator=gen, requires_grad=True)
    w1 = (0.5 * torch.randn(num_experts, d, 2 * ffn, generator=gen)).requires_grad_(True)
    w2 = (0.5 * torch.randn(num_experts, ffn, d, generator=gen)).requires_grad_(True)
    x_ref, w1_ref, w2_ref = (t.detach().clone().requires_grad_(True) for t in (x, w1, w2))

    if case == "many_rows":
        assert path_rule(counts, weight_index) == "loop"
    y = PATHS[path](x, counts, w1, w2, weight_index)
    y_ref = per_token_reference(x_ref, counts, w1_ref, w2_ref, weight_index)
    assert y.shape == (sum(counts), d)
    tol = {"rtol": 1e-5, "atol": 1e-4} if sum(counts) > 128 else {}  # weight grads: sums of ~200 row products
    assert_close(y, y_ref, **tol)

    g = torch.randn(y.shape, generator=gen)
    y.backward(g)
    y_ref.backward(g)
    assert_close(x.grad, x_ref.grad, **tol)
    assert_close(w1.grad, w1_ref.grad, **tol)
    assert_close(w2.grad, w2_ref.grad, **tol)
    used = {e for e, n in zip(weight_index or range(len(counts)), counts) if n}
    for e in range(num_experts):  # unused experts get exactly zero gradient, used ones a real one
        assert (w1.grad[e].abs().sum() > 0) == (e in used)


def test_replica_gradients_accumulate():
    """Two segments of one expert give the weight gradient of the two blocks of rows summed."""
    d, ffn = 8, 8
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, d, generator=gen)
    w1 = torch.randn(2, d, 2 * ffn, generator=gen, requires_grad=True)
    w2 = torch.randn(2, ffn, d, generator=gen, requires_grad=True)
    for fn in PATHS.values():
        w1.grad = w2.grad = None
        fn(x, [2, 3], w1, w2, [1, 1]).sum().backward()
        both = (w1.grad.clone(), w2.grad.clone())
        parts = []
        for rows in (slice(0, 2), slice(2, 5)):
            w1.grad = w2.grad = None
            fn(x[rows], [rows.stop - rows.start], w1, w2, [1]).sum().backward()
            parts.append((w1.grad.clone(), w2.grad.clone()))
        assert_close(both[0], parts[0][0] + parts[1][0])
        assert_close(both[1], parts[0][1] + parts[1][1])
        assert both[0][0].abs().sum() == 0


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("counts", [[], [0, 0, 0]])
def test_empty_input(path, counts):
    x = torch.randn(0, 8, requires_grad=True)
    w1 = torch.randn(3, 8, 24, requires_grad=True)
    w2 = torch.randn(3, 12, 8, requires_grad=True)
    y = PATHS[path](x, counts, w1, w2)
    assert y.shape == (0, 8)
    y.sum().backward()  # still attached to the graph: zero gradients, no error
    assert x.grad.shape == (0, 8)
    assert w1.grad is None or w1.grad.abs().sum() == 0
    assert w2.grad is None or w2.grad.abs().sum() == 0


@pytest.mark.parametrize("path", sorted(PATHS))
def test_no_grad_and_noncontiguous_input(path):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 14, generator=gen)[:, ::2]  # [8, 7], column stride 2
    counts, index = [3, 0, 5], [2, 0, 2]
    w1 = torch.randn(3, 7, 10, generator=gen)
    w2 = torch.randn(3, 5, 7, generator=gen)
    with torch.no_grad():
        y = PATHS[path](x, counts, w1, w2, index)
    assert not y.requires_grad
    assert_close(y, per_token_reference(x, counts, w1, w2, index))


def test_module_and_realistic_routing_all_paths_agree():
    """Top-2 routing over 8 experts with skew, through SwiGLUExperts: auto == loop == padded (fp32 rounding)."""
    torch.manual_seed(0)
    experts = SwiGLUExperts(8, 32, 48, init_std=0.2)
    ids = torch.multinomial(torch.softmax(torch.randn(8), 0).expand(40, 8), 2).flatten()
    counts = torch.bincount(ids, minlength=8).tolist()
    x = torch.randn(80, 32)
    ys = [experts(x, counts, list(range(8)))]
    ys += [fn(x, counts, experts.w1, experts.w2) for fn in (grouped_swiglu_loop, grouped_swiglu_padded)]
    for y in ys[1:]:
        assert_close(y, ys[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [grouped_swiglu, grouped_swiglu_loop, grouped_swiglu_padded])
def test_rejects_bad_counts(fn):
    w1, w2 = torch.randn(2, 4, 8), torch.randn(2, 4, 4)
    with pytest.raises(ValueError, match="counts sum to 3"):
        fn(torch.randn(4, 4), [1, 2], w1, w2)
    with pytest.raises(ValueError, match="len\\(weight_index\\) = 1"):
        fn(torch.randn(3, 4), [1, 2], w1, w2, [0])


def test_selection_rule():
    # few rows per expert with padding (small batch: 64 tokens top-2 over 32 experts): the loop (quiet-box winner)
    assert path_rule([4] * 31 + [11]) == "loop"
    assert path_rule([1, 9, 0, 3] * 8) == "loop"
    # no padding to speak of: padded (the loop's FLOPs in 2 ops)
    assert path_rule([4] * 32) == "padded"
    assert path_rule([5, 5, 6, 5]) == "padded"  # waste 24 / 21 = 1.14
    assert path_rule([5, 5, 8, 5]) == "loop"  # waste 32 / 23 = 1.39
    # many rows per expert, skewed (4096 tokens top-2): loop
    skewed = [150, 400, 220, 600, 180, 260, 90, 300] * 4
    assert path_rule(skewed) == "loop"
    # replica segments of one expert are merged before the rule: {0: 20, 1: 30} rows, padded to 2 * 30 = 60 rows
    # (waste 1.2): padded; the same segments as three experts (3 * 30 = 90 rows for 50): loop
    assert path_rule([10, 10, 30], [0, 0, 1]) == "padded"
    assert path_rule([10, 10, 30], [0, 2, 1]) == "loop"
    assert path_rule([]) == "loop"
    assert path_rule([0, 0]) == "loop"
    assert padded_is_faster([4] * 32) and not padded_is_faster([1, 9, 0, 3] * 8)



@pytest.mark.parametrize(
    ("counts", "grad", "expected"),
    [
        ([4] * 32, False, "grouped_swiglu_padded"),
        ([150, 400, 220, 600] * 8, True, "grouped_swiglu_fused"),  # autograd: the fused loop at any size
        ([150, 400, 220, 600] * 8, False, "grouped_swiglu_loop"),  # forward, 342 rows per expert: the plain loop
        ([1, 9, 0, 3] * 8, False, "grouped_swiglu_fused"),  # forward, 4.3 rows per expert: fused
    ],
)
def test_grouped_swiglu_dispatches_by_the_rule(monkeypatch, counts, grad, expected):
    import moe_runtime.model.experts as mod

    called = []
    for name in ("grouped_swiglu_loop", "grouped_swiglu_padded", "grouped_swiglu_fused"):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _n=name, _f=real, **k: called.append(_n) or _f(*a, **k))
    x = torch.randn(sum(counts), 4, requires_grad=grad)
    mod.grouped_swiglu(x, counts, torch.randn(32, 4, 8), torch.randn(32, 4, 4))
    assert called == [expected]
    assert mod.fused_forward_wins(counts) == (sum(counts) <= 8 * sum(1 for n in counts if n))


def test_fused_forward_rule():
    """Mean rows per used expert <= FUSED_FORWARD_MAX_MEAN_ROWS (8); replicas merged; nothing used: False."""
    assert fused_forward_wins([8] * 4) and not fused_forward_wins([9] * 4)
    assert fused_forward_wins([1, 0, 15]) and not fused_forward_wins([1, 0, 16])
    assert not fused_forward_wins([6, 6], [0, 0])  # one expert with 12 rows
    assert not fused_forward_wins([]) and not fused_forward_wins([0, 0])


def test_handwritten_backward_matches_autograd():
    """swiglu_forward_saving + swiglu_backward give autograd's y, dx, dw1 and dw2 (fp32 rounding), writing into
    `out` / `dx_out` slices when given."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(7, 8, generator=gen)
    w1, w2 = torch.randn(8, 20, generator=gen), torch.randn(10, 8, generator=gen)
    dy = torch.randn(7, 8, generator=gen)
    xr, w1r, w2r = (t.clone().requires_grad_() for t in (x, w1, w2))
    y_ref = swiglu(xr, w1r, w2r)
    y_ref.backward(dy)
    y_buf, dx_buf = torch.zeros(9, 8), torch.zeros(9, 8)
    with torch.no_grad():
        y, h = swiglu_forward_saving(x, w1, w2, out=y_buf[1:8])
        dx, dw1, dw2 = swiglu_backward(dy, x, h, w1, w2, dx_out=dx_buf[2:9])
    assert y.data_ptr() == y_buf[1:8].data_ptr() and dx.data_ptr() == dx_buf[2:9].data_ptr()
    assert_close(h, x @ w1)
    assert_close(y, y_ref)
    assert_close(dx, xr.grad)
    assert_close(dw1, w1r.grad)
    assert_close(dw2, w2r.grad)


def test_grouped_saving_forward_and_backward_match_grouped_swiglu():
    """Per-segment weights (the server's layout, one pair per segment) against grouped_swiglu under autograd, with
    a zero-count segment."""
    gen = torch.Generator().manual_seed(12)
    counts, index = [3, 0, 5, 2], [1, 3, 0, 2]
    x = torch.randn(sum(counts), 8, generator=gen)
    dy = torch.randn(sum(counts), 8, generator=gen)
    w1 = torch.randn(4, 8, 12, generator=gen, requires_grad=True)
    w2 = torch.randn(4, 6, 8, generator=gen, requires_grad=True)
    xr = x.clone().requires_grad_()
    y_ref = grouped_swiglu(xr, counts, w1, w2, index)
    y_ref.backward(dy)
    weights = [(w1[e].detach(), w2[e].detach()) for e in index]
    y, hs = grouped_swiglu_forward_saving(x, counts, weights)
    dx, wgrads = grouped_swiglu_backward(dy, counts, x, hs, weights)
    assert not y.requires_grad and [h.shape[0] for h in hs] == counts
    assert_close(y, y_ref)
    assert_close(dx, xr.grad)
    for e, (dw1, dw2) in zip(index, wgrads):
        assert_close(dw1, w1.grad[e])
        assert_close(dw2, w2.grad[e])


def test_fused_chunks_rule():
    """Consecutive non-empty segments, <= max_rows rows per chunk, a longer segment alone; (start, rows, expert)."""
    assert fused_chunks([3, 0, 5, 2], [1, 3, 0, 2], max_rows=8) == [[(0, 3, 1), (3, 5, 0)], [(8, 2, 2)]]
    assert fused_chunks([20, 1, 1], max_rows=8) == [[(0, 20, 0)], [(20, 1, 1), (21, 1, 2)]]
    assert fused_chunks([4] * 4, max_rows=128) == [[(0, 4, 0), (4, 4, 1), (8, 4, 2), (12, 4, 3)]]
    assert fused_chunks([]) == [] and fused_chunks([0, 0]) == []


def _skewed_setup(seed, tokens=96, experts=8, d=32, ffn=48):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.multinomial(torch.softmax(torch.randn(experts, generator=gen), 0).expand(tokens, experts), 2,
                            generator=gen).flatten()  # fmt: skip
    counts = torch.bincount(ids, minlength=experts).tolist()
    x = torch.randn(sum(counts), d, generator=gen)
    w1 = 0.2 * torch.randn(experts, d, 2 * ffn, generator=gen)
    w2 = 0.2 * torch.randn(experts, ffn, d, generator=gen)
    return counts, x, w1, w2


def _fwd_bwd(fn, counts, x, w1, w2, dy):
    x, w1, w2 = (t.clone().requires_grad_(True) for t in (x, w1, w2))
    y = fn(x, counts, w1, w2)
    y.backward(dy)
    return y.detach(), x.grad, w1.grad, w2.grad


@pytest.mark.parametrize("seed", range(3))
def test_fused_is_deterministic_and_matches_the_loop(seed):
    """Same inputs, same bits (run twice); the loop's output and every gradient up to fp32 rounding, with more rows
    than one chunk (several chunks, replica-free skewed routing)."""
    counts, x, w1, w2 = _skewed_setup(seed, tokens=160)
    assert sum(counts) > 128
    dy = torch.randn(sum(counts), x.shape[1], generator=torch.Generator().manual_seed(seed + 100))
    first = _fwd_bwd(grouped_swiglu_fused, counts, x, w1, w2, dy)
    again = _fwd_bwd(grouped_swiglu_fused, counts, x, w1, w2, dy)
    loop = _fwd_bwd(grouped_swiglu_loop, counts, x, w1, w2, dy)
    for a, b, ref in zip(first, again, loop):
        assert torch.equal(a, b)
        assert_close(a, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the no-grad forward (one reused h buffer) gives the same bits as the autograd one
        assert torch.equal(grouped_swiglu_fused(x, counts, w1, w2), first[0])


@pytest.mark.parametrize("needs", ["x", "w1", "w2", "weights"])
def test_fused_partial_gradients(needs):
    """Only the inputs that require grad get one (frozen experts, or a frozen input), each equal to the loop's."""
    counts, x, w1, w2 = _skewed_setup(5, tokens=24)
    grads = {}
    for fn in (grouped_swiglu_fused, grouped_swiglu_loop):
        xs = {"x": x.clone(), "w1": w1.clone(), "w2": w2.clone()}
        for name, t in xs.items():
            t.requires_grad_(name == needs or (needs == "weights" and name != "x"))
        fn(xs["x"], counts, xs["w1"], xs["w2"]).pow(2).sum().backward()
        grads[fn] = {k: t.grad for k, t in xs.items()}
    for name in ("x", "w1", "w2"):
        got, ref = grads[grouped_swiglu_fused][name], grads[grouped_swiglu_loop][name]
        assert (got is None) == (ref is None) == (name != needs and not (needs == "weights" and name != "x"))
        if ref is not None:
            assert_close(got, ref)


def test_grouped_mm_offsets_rule():
    """One group per expert in [first, last] of a chunk, ends relative to the chunk, an unused expert an empty group;
    None for one segment (a plain mm) and for replicas or unsorted experts (the per-segment loop)."""
    assert grouped_mm_offsets([(10, 3, 2), (13, 4, 3), (17, 1, 5)]) == [3, 7, 7, 8]
    assert grouped_mm_offsets([(0, 2, 0), (2, 2, 1)]) == [2, 4]
    assert grouped_mm_offsets([(0, 5, 4)]) is None
    assert grouped_mm_offsets([(0, 2, 3), (2, 2, 1)]) is None
    assert grouped_mm_offsets([(0, 2, 1), (2, 2, 1)]) is None


def _counting_grouped_mm(monkeypatch):
    calls = []
    real = torch._grouped_mm

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counted)
    return calls


@pytest.mark.parametrize("seed", range(2))
def test_fused_grouped_mm_chunks_match_the_loop(monkeypatch, seed):
    """Chunks of several segments run as torch._grouped_mm (forward, du, dx): output and every gradient bit-equal to
    the same fused loop without it and to the plain loop up to rounding, no-grad forward included; zero-count
    experts inside a chunk are empty groups."""
    counts, x, w1, w2 = _skewed_setup(seed, tokens=160, experts=12, d=16, ffn=24)
    counts[3] = 0  # an unused expert between used ones
    x = x[: sum(counts)]
    dy = torch.randn(sum(counts), x.shape[1], generator=torch.Generator().manual_seed(seed + 7))
    calls = _counting_grouped_mm(monkeypatch)
    with_gmm = _fwd_bwd(grouped_swiglu_fused, counts, x, w1, w2, dy)
    assert len(calls) >= 4  # two in the forward and two in the backward per multi-segment chunk
    calls.clear()
    without = _fwd_bwd(partial(grouped_swiglu_fused, use_grouped_mm=False), counts, x, w1, w2, dy)
    assert not calls
    loop = _fwd_bwd(grouped_swiglu_loop, counts, x, w1, w2, dy)
    for a, b, ref in zip(with_gmm, without, loop):
        assert torch.equal(a, b)
        assert_close(a, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # gated in place in h: still the same bits
        assert torch.equal(grouped_swiglu_fused(x, counts, w1, w2), with_gmm[0])
        assert torch.equal(grouped_swiglu(x, counts, w1, w2), with_gmm[0])


def test_fused_falls_back_where_grouped_mm_does_not_fit(monkeypatch):
    """d = 6 (rows of 24 bytes, not a multiple of 16): no torch._grouped_mm call, the per-segment loop, same result."""
    counts, x, w1, w2 = _skewed_setup(3, tokens=40, experts=6, d=6, ffn=10)
    dy = torch.randn(sum(counts), 6, generator=torch.Generator().manual_seed(1))
    calls = _counting_grouped_mm(monkeypatch)
    got = _fwd_bwd(grouped_swiglu_fused, counts, x, w1, w2, dy)
    assert not calls
    for a, ref in zip(got, _fwd_bwd(grouped_swiglu_loop, counts, x, w1, w2, dy)):
        assert_close(a, ref, rtol=1e-5, atol=1e-5)


def test_fused_in_float64_falls_back_to_the_loop(monkeypatch):
    """torch._grouped_mm refuses float64 (the tests' oracles run in it): the per-segment loop, same result."""
    counts, x, w1, w2 = _skewed_setup(3, tokens=40, experts=6, d=8, ffn=16)
    x, w1, w2 = (t.double() for t in (x, w1, w2))
    dy = torch.randn(sum(counts), 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calls = _counting_grouped_mm(monkeypatch)
    got = _fwd_bwd(grouped_swiglu_fused, counts, x, w1, w2, dy)
    assert not calls
    for a, ref in zip(got, _fwd_bwd(grouped_swiglu_loop, counts, x, w1, w2, dy)):
        assert_close(a, ref, rtol=1e-10, atol=1e-10)
