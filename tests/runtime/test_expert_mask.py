"""The router worker's expert mask (runtime/expert_mask.py) without Ray: a forward or cached decode step that meets
experts with no live replica is re-run with them masked in every layer and equals an in-process model whose routers
exclude the same experts from the start; a decode step that failed half-way (layer 0 done, layer 1 failed) is re-run
from the cache as it was. The fault is injected where the real one surfaces: the layer's dispatcher marks the actor
down and raises ExpertsUnavailable, as dispatch/failover.py does."""

from __future__ import annotations

import grpc
import pytest
import torch
from torch import nn

from moe_runtime.config import parse_config
from moe_runtime.dispatch.failover import ExpertsUnavailable, Failover
from moe_runtime.generation.backend import LocalBackend
from moe_runtime.model.experts import SwiGLUExperts
from moe_runtime.model.moe_layer import LocalDispatcher, StepContext
from moe_runtime.model.transformer import build_model
from moe_runtime.placement import Placement
from moe_runtime.runtime.expert_mask import ExpertMask, MaskError, MaskingBackend

CFG = parse_config({"model": {"preset": "tiny"}}).model
DEAD_ACTOR = 1


class DyingActor(nn.Module):
    """Layer `index`'s experts in process, actor DEAD_ACTOR's answering until `dead[0]` (then only in layers not
    in `fail_layers`, so a failure can be placed past the first layer)."""

    def __init__(self, index: int, placement: Placement, failover: Failover, dead: list[bool], fail_layers):
        super().__init__()
        experts = SwiGLUExperts(CFG.num_experts, CFG.hidden_size, CFG.ffn_hidden_size, CFG.init_std)
        self.inner = LocalDispatcher(experts, placement)
        self.placement, self.index, self.failover, self.dead, self.fail_layers = (placement, index, failover, dead,
                                                                                   fail_layers)  # fmt: skip
        self.calls = 0

    def forward(self, x_nd, plan, ctx=None):
        self.calls += 1
        hit = sorted({s.expert for s in plan.segments if s.actor == DEAD_ACTOR and s.count})
        if self.dead[0] and self.index in self.fail_layers and hit:
            self.failover.mark_down(DEAD_ACTOR, "UNAVAILABLE: connection refused")
            raise ExpertsUnavailable("127.0.0.1:1", "Dispatch", self.index, ctx.step if ctx else None,
                                     grpc.StatusCode.UNAVAILABLE, f"layer {self.index}: actor {DEAD_ACTOR} held the "
                                     f"only replica of experts {hit}")  # fmt: skip
        return self.inner(x_nd, plan, ctx)


def _models(placement: Placement, fail_layers=(0, 1)):
    """(model under test with its mask and dead flag, reference model with the same weights)."""
    failover, dead = Failover(), [False]
    model = build_model(CFG, 0, lambda i: DyingActor(i, placement, failover, dead, fail_layers)).eval()
    ref = build_model(CFG, 0, lambda i: DyingActor(i, placement, Failover(), [False], ())).eval()
    ref.load_state_dict(model.state_dict())
    return model, ExpertMask(model, failover, lambda: placement, enabled=True), dead, ref


def _mask_ref(ref, experts) -> None:
    for moe in ref.moe_layers:
        moe.router.set_expert_alive([e not in experts for e in range(CFG.num_experts)])


TWO = Placement.contiguous(CFG.num_layers, CFG.num_experts, 2)  # actor 1 alone holds experts 4..7
LOST = [4, 5, 6, 7]
TOKENS = torch.randint(0, CFG.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))


def test_forward_meeting_a_lost_expert_is_rerun_masked_and_equals_the_masked_model():
    model, mask, dead, ref = _models(TWO)
    with torch.no_grad():
        want_plain = ref(TOKENS).logits
        torch.testing.assert_close(mask.run(lambda: model(TOKENS, StepContext.for_inference(0)).logits), want_plain)
        assert mask.take_seen() == []
        dead[0] = True
        got = mask.run(lambda: model(TOKENS, StepContext.for_inference(1)).logits)
        _mask_ref(ref, LOST)
        want = ref(TOKENS).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(want, want_plain)  # the mask changed the answer: the comparison means something
    assert mask.pairs() == [(layer, e) for layer in range(CFG.num_layers) for e in LOST]
    assert mask.take_seen() == mask.pairs() and mask.take_seen() == []
    mask.clear()  # healed
    assert mask.pairs() == [] and all(m.router.expert_alive_e is None for m in model.moe_layers)


def test_decode_failing_past_the_first_layer_is_rerun_from_the_cache_as_it_was():
    model, mask, dead, ref = _models(TWO, fail_layers=(1,))  # layer 0 appends to the cache, then layer 1 fails
    backend, ref_backend = MaskingBackend(model, mask), LocalBackend(ref)
    prompts = [[5, 9, 33, 2], [7, 1]]
    cache, logits = backend.prefill(prompts, 16)
    ref_cache, ref_logits = ref_backend.prefill(prompts, 16)
    torch.testing.assert_close(logits, ref_logits)
    dead[0] = True
    calls_before = model.moe_layers[0].dispatcher.calls
    got = backend.decode(cache, [11, 12])
    assert model.moe_layers[0].dispatcher.calls == calls_before + 2  # layer 0 ran twice: a re-run happened
    _mask_ref(ref, LOST)
    torch.testing.assert_close(got, ref_backend.decode(ref_cache, [11, 12]))
    torch.testing.assert_close(backend.decode(cache, [3, 4]), ref_backend.decode(ref_cache, [3, 4]))
    assert cache.lengths == ref_cache.lengths == [6, 4]


def test_fail_mode_raises_and_masks_nothing():
    model, mask, dead, _ = _models(TWO)
    mask.enabled = False
    dead[0] = True
    with torch.no_grad(), pytest.raises(ExpertsUnavailable, match=r"actor 1 held the only replica of experts"):
        mask.run(lambda: model(TOKENS, StepContext.for_inference(0)).logits)
    assert mask.pairs() == [] and all(m.router.expert_alive_e is None for m in model.moe_layers)


def test_a_mask_leaving_fewer_than_k_experts_fails_clearly_and_changes_nothing():
    seven = Placement(num_actors=2, replicas=tuple((((0,),) + ((1,),) * 7) for _ in range(CFG.num_layers)))
    model, mask, dead, _ = _models(seven)
    dead[0] = True
    with torch.no_grad(), pytest.raises(MaskError, match=r"masking them would leave too few experts: layer 0: "
                                                         r"expert_alive: 1 of 8 experts alive .*fewer than top_k = 2"):  # fmt: skip
        mask.run(lambda: model(TOKENS, StepContext.for_inference(0)).logits)
    assert mask.pairs() == [] and all(m.router.expert_alive_e is None for m in model.moe_layers)
