"""ExpertShards on its own (no gRPC): math against autograd, saved activations keyed and freed, replay and mismatch
refused, load / drop, token counts, concurrent callers; and sum_replica_grads, the replica rule."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.testing import assert_close

from moe_runtime.dispatch.server import ActivationKey, ActivationsMissing, SegmentsMismatch
from moe_runtime.model.experts import swiglu
from moe_runtime.placement import Placement
from moe_runtime.runtime.expert_shards import ExpertShards, sum_replica_grads
from tests.dispatch.helpers import FF, D, make_shards

KEYS = [(0, 0), (0, 1), (0, 2), (1, 0)]


@pytest.fixture
def shards():
    return ExpertShards(make_shards(KEYS))


def reference(shards, layer, experts, counts, x, dy):
    """Autograd on leaf copies of the weights, segment by segment: y, dx and the weight grads per expert."""
    w = {e: tuple(t.clone().requires_grad_() for t in shards.weights()[(layer, e)]) for e in experts}
    xr = x.clone().requires_grad_()
    ys, start = [], 0
    for e, n in zip(experts, counts):
        ys.append(swiglu(xr[start : start + n], *w[e]))
        start += n
    y = torch.cat(ys)
    y.backward(dy)
    return y.detach(), xr.grad, {e: (a.grad, b.grad) for e, (a, b) in w.items()}


def test_forward_backward_match_autograd_and_consume_the_entry(shards):
    experts, counts = (2, 0, 1), (4, 1, 3)
    x, dy = torch.randn(8, D), torch.randn(8, D)
    key = ActivationKey(step=3, mb=1, layer=0, src=2)
    y = shards.forward(0, experts, counts, x.clone(), key)
    assert shards.saved_keys() == [key]
    dx = shards.backward(0, experts, counts, dy, key)
    y_ref, dx_ref, g_ref = reference(shards, 0, experts, counts, x, dy)
    assert_close(y, y_ref)
    assert_close(dx, dx_ref)
    grads = shards.grads()
    for e in experts:
        assert_close(grads[(0, e)][0], g_ref[e][0])
        assert_close(grads[(0, e)][1], g_ref[e][1])
    assert grads[(1, 0)][0].abs().sum() == 0
    assert shards.saved_keys() == [] and shards.stats()["saved_bytes"] == 0


def test_saved_entries_are_freed_by_step_and_counted(shards):
    x = torch.randn(4, D)
    for step in range(3):
        shards.forward(0, (0,), (4,), x.clone(), ActivationKey(step, 0, 0, 0))
    shards.forward(0, (0,), (4,), x.clone(), None)  # inference: nothing kept
    s = shards.stats()
    assert s["saved_entries"] == 3
    per_entry = s["saved_bytes"] // 3
    assert per_entry == 4 * D * 4 + 4 * 2 * FF * 4  # x and x @ w1, fp32
    assert shards.end_step(1) == (2, 2 * per_entry)
    assert shards.saved_keys() == [(2, 0, 0, 0)]
    assert shards.abort_step(5) == (1, per_entry)
    assert (shards.stats()["steps_ended"], shards.stats()["steps_aborted"]) == (1, 1)
    shards.forward(0, (0,), (4,), x.clone(), ActivationKey(7, 0, 0, 0))
    shards.forward(0, (0,), (4,), x.clone(), ActivationKey(7, 0, 0, 0))  # a retried forward replaces the entry
    assert shards.saved_keys() == [(7, 0, 0, 0)] and shards.stats()["overwritten"] == 1


def test_replay_and_mismatch_are_refused(shards):
    x = torch.randn(6, D)
    key = ActivationKey(2, 0, 0, 0)
    shards.forward(0, (0, 1), (3, 3), x.clone(), key)
    with pytest.raises(SegmentsMismatch, match=r"experts=\[0, 1\] counts=\[4, 2\] do not match the forward's"):
        shards.backward(0, (0, 1), (4, 2), x, key)
    assert shards.saved_keys() == [key]  # a mismatch keeps the entry for the right backward
    shards.backward(0, (0, 1), (3, 3), x, key)
    once = {k: (a.clone(), b.clone()) for k, (a, b) in shards.grads().items()}
    with pytest.raises(ActivationsMissing, match="no saved forward for step 2, micro-batch 0, layer 0, src 0"):
        shards.backward(0, (0, 1), (3, 3), x, key)
    for k, (a, b) in shards.grads().items():
        assert torch.equal(a, once[k][0]) and torch.equal(b, once[k][1])


def test_load_drop_and_validation(shards):
    w = make_shards([(0, 5)], seed=3)
    shards.load(w)
    w[(0, 5)][0].zero_()  # the shards keep their own copies
    assert shards.weights()[(0, 5)][0].abs().sum() > 0
    assert shards.hosted == frozenset(KEYS + [(0, 5)]) and shards.hidden_size(0, 5) == D
    shards.drop([(0, 5), (0, 0)])
    assert sorted(shards.weights()) == sorted(shards.grads()) == [(0, 1), (0, 2), (1, 0)]
    with pytest.raises(KeyError) as info:
        shards.forward(0, (0,), (2,), torch.randn(2, D), None)
    assert info.value.args == ((0, 0),)  # the server answers "shard (0, 0) was dropped"
    with pytest.raises(KeyError, match="not hosted"):
        shards.drop([(3, 3)])
    with pytest.raises(KeyError, match=r"set_grads: shard \(3, 3\) not hosted"):
        shards.set_grads({(3, 3): (torch.zeros(D, 2 * FF), torch.zeros(FF, D))})
    with pytest.raises(ValueError, match=r"expected w1 \[d, 2f\] and w2 \[f, d\]"):
        shards.load({(0, 7): (torch.zeros(D, 2 * FF), torch.zeros(FF + 1, D))})
    with pytest.raises(ValueError, match="expected \\(layer, expert\\) of non-negative ints"):
        shards.load({(0, -1): (torch.zeros(D, 2 * FF), torch.zeros(FF, D))})
    shards.set_placement_version(4)
    shards.load(make_shards([(2, 2)]), replace=True)
    assert list(shards.weights()) == [(2, 2)]
    s = shards.summary()
    assert (s.placement_version, s.num_shards, s.saved_entries) == (4, 1, 0)


def test_token_counts_and_concurrent_callers_add_up(shards):
    """8 threads x (forward + backward) on the same experts, distinct keys: counts and grads add up exactly."""
    xs = [torch.randn(4, D) for _ in range(8)]
    dys = [torch.randn(4, D) for _ in range(8)]
    errors = []

    def work(i):
        try:
            key = ActivationKey(0, i, 0, i % 2)
            shards.forward(0, (0, 1), (2, 2), xs[i].clone(), key)
            shards.backward(0, (0, 1), (2, 2), dys[i], key)
        except Exception as e:  # noqa: BLE001  (surfaced by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    expected = {(0, 0): torch.zeros(D, 2 * FF), (0, 1): torch.zeros(D, 2 * FF)}
    for x, dy in zip(xs, dys):
        _, _, g = reference(shards, 0, (0, 1), (2, 2), x, dy)
        for e in (0, 1):
            expected[(0, e)] += g[e][0]
    grads = shards.grads()
    for k, g1 in expected.items():
        assert_close(grads[k][0], g1)
    assert shards.expert_token_counts(reset=True) == {(0, 0): 16, (0, 1): 16}
    assert shards.expert_token_counts() == {}
    shards.zero_grads()
    assert all(a.abs().sum() == 0 and b.abs().sum() == 0 for a, b in shards.grads().values())


# ------------------------------------------------------------------------------------------------ replicas


def test_sum_replica_grads_sums_over_replicas_only():
    placement = Placement(3, (((0, 2), (1,)), ((0, 1, 2), (2,))))
    g = torch.Generator().manual_seed(0)
    grads = [{k: (torch.randn(2, 4, generator=g), torch.randn(2, 2, generator=g)) for k in placement.shards_of(a)}
             for a in range(3)]  # fmt: skip
    summed = sum_replica_grads(grads, placement)
    assert_close(summed[(0, 0)][0], grads[0][(0, 0)][0] + grads[2][(0, 0)][0])
    assert_close(summed[(1, 0)][1], grads[0][(1, 0)][1] + grads[1][(1, 0)][1] + grads[2][(1, 0)][1])
    assert torch.equal(summed[(0, 1)][0], grads[1][(0, 1)][0])
    with pytest.raises(KeyError, match=r"actor 2 holds no grads for \(layer 0, expert 0\)"):
        sum_replica_grads([grads[0], grads[1], {}], placement)
    with pytest.raises(ValueError, match="got grads of 2 actors"):
        sum_replica_grads(grads[:2], placement)


def test_sum_replica_grads_over_chosen_keys_in_one_fixed_order():
    """The cluster sends only the replicated experts' grads: the other actors give {}; the sum is new tensors in
    the order (other replicas, then the first), the same bits for every replica."""
    placement = Placement(3, (((0, 2), (1,)), ((0, 1, 2), (2,))))
    g = torch.Generator().manual_seed(1)
    keys = [(0, 0), (1, 0)]
    grads = [{k: (torch.randn(3, 4, generator=g), torch.randn(3, 2, generator=g)) for k in keys
              if a in placement.replicas[k[0]][k[1]]} for a in range(3)]  # fmt: skip
    before = [{k: (a.clone(), b.clone()) for k, (a, b) in d.items()} for d in grads]
    summed = sum_replica_grads(grads, placement, keys)
    assert sorted(summed) == keys
    assert torch.equal(summed[(1, 0)][0], (grads[1][(1, 0)][0] + grads[2][(1, 0)][0]) + grads[0][(1, 0)][0])
    assert torch.equal(summed[(0, 0)][1], grads[2][(0, 0)][1] + grads[0][(0, 0)][1])
    for d, b in zip(grads, before):  # inputs untouched
        assert all(torch.equal(d[k][0], b[k][0]) and torch.equal(d[k][1], b[k][1]) for k in d)


def test_grad_buffers_are_allocated_at_the_first_backward_only():
    shards = ExpertShards(make_shards(KEYS))
    key = ActivationKey(step=0, mb=0, layer=0, src=0)
    x = torch.randn(5, D)
    shards.forward(0, (0, 1), (2, 3), x, None)  # inference: nothing saved, no grad buffer
    assert shards.grad_buffers_allocated() == 0
    shards.forward(0, (0, 1), (2, 3), x, key)
    assert shards.grad_buffers_allocated() == 0
    shards.backward(0, (0, 1), (2, 3), torch.randn(5, D), key)
    assert shards.grad_buffers_allocated() == len(KEYS)  # every hosted shard: untouched ones hold zeros
    assert shards.grads()[(1, 0)][0].abs().sum() == 0 and shards.grads()[(0, 0)][0].abs().sum() > 0
    shards.load({(1, 0): make_shards([(1, 0)], seed=5)[(1, 0)]})  # a reloaded shard's grads start again at 0
    assert shards.grad_buffers_allocated() == len(KEYS) - 1


def test_bf16_storage_computes_in_fp32_on_the_rounded_weights():
    """Weights stored in bf16 (model.expert_weight_dtype) give fp32 shards' results on the bf16-rounded weights,
    forward and backward, and their grads are fp32."""
    raw = make_shards(KEYS)
    rounded = {k: (a.bfloat16().float(), b.bfloat16().float()) for k, (a, b) in raw.items()}
    bf, fp = ExpertShards(raw, storage_dtype=torch.bfloat16), ExpertShards(rounded)
    assert all(w.dtype == torch.bfloat16 for pair in bf.weights().values() for w in pair)
    experts, counts = (2, 0, 1), (4, 1, 3)
    x, dy = torch.randn(8, D), torch.randn(8, D)
    key = ActivationKey(step=1, mb=0, layer=0, src=0)
    y_bf, y_fp = bf.forward(0, experts, counts, x.clone(), key), fp.forward(0, experts, counts, x.clone(), key)
    assert y_bf.dtype == torch.float32
    torch.testing.assert_close(y_bf, y_fp, rtol=0, atol=0)
    torch.testing.assert_close(bf.backward(0, experts, counts, dy, key), fp.backward(0, experts, counts, dy, key),
                               rtol=0, atol=0)
    for k in KEYS:
        assert bf.grads()[k][0].dtype == torch.float32
        torch.testing.assert_close(bf.grads()[k][0], fp.grads()[k][0], rtol=0, atol=0)
