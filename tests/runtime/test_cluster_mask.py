"""One mask for every router worker (runtime/cluster_mask.py) without Ray: the rows of a forward are split over
two workers, each with its own model, Failover and mask (RouterWorker.forward_agreed itself, on a worker object
holding only what it reads). Under top_p routing (gates = the softmax over the live experts) a row's logits depend on
the mask even when it chose no lost expert, so a worker that masks alone mixes a response: shown first, then the
agreement makes every row equal the in-process model masked the same way. The fault is the one of
test_expert_mask.py: the layer's dispatcher marks actor 1 down and raises ExpertsUnavailable."""

from __future__ import annotations

import functools

import pytest
import torch

from moe_runtime.config import parse_config
from moe_runtime.dispatch.failover import Failover
from moe_runtime.model.device import ComputeDevice
from moe_runtime.model.moe_layer import StepContext
from moe_runtime.model.transformer import build_model
from moe_runtime.placement import Placement
from moe_runtime.runtime.cluster_mask import MaskDisagreement, forward_under_one_mask, mask_pairs
from moe_runtime.runtime.expert_mask import ExpertMask
from moe_runtime.runtime.router_worker import DataPlaneError, RouterWorker
from tests.runtime.test_expert_mask import DEAD_ACTOR, DyingActor

CFG = parse_config({"model": {"preset": "tiny", "routing": "top_p", "top_p": 0.3, "k_max": 2}}).model
FOUR = Placement.contiguous(CFG.num_layers, CFG.num_experts, 4)  # actor 1 alone holds experts 2, 3
LOST = [[layer, e] for layer in range(CFG.num_layers) for e in (2, 3)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small matmuls: one thread (a loaded 2-core machine makes torch's default threads crawl)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _worker(index: int, dead: list[bool], weights: dict | None, mask_mode: bool = True) -> RouterWorker:
    """A RouterWorker (not an actor: no corpus, no clients) holding what forward_agreed reads: its model
    (dispatchers that die with `dead`), Failover, mask."""
    failover = Failover("mask" if mask_mode else "fail")
    model = build_model(CFG, 0, lambda i: DyingActor(i, FOUR, failover, dead, (0, 1))).eval()
    if weights is not None:
        model.load_state_dict(weights)
    mask = ExpertMask(model, failover, lambda: FOUR, enabled=mask_mode)
    worker = RouterWorker.__new__(RouterWorker)
    worker.__dict__.update(index=index, model=model, mask=mask, failover=failover, device="cpu", dense_loaded=True,
                           compute=ComputeDevice.resolve("cpu", "fp32"))
    return worker


def _setup(mask_mode: bool = True):
    dead = [False]
    w0 = _worker(0, dead, None, mask_mode)
    w1 = _worker(1, dead, w0.model.state_dict(), mask_mode)
    ref = build_model(CFG, 0, lambda i: DyingActor(i, FOUR, Failover(), [False], ())).eval()
    ref.load_state_dict(w0.model.state_dict())
    return dead, [w0, w1], ref


def _set_mask(model, pairs) -> None:
    for layer, moe in enumerate(model.moe_layers):
        gone = {e for la, e in pairs if la == layer}
        moe.router.set_expert_alive([e not in gone for e in range(CFG.num_experts)] if gone else None)


@functools.cache
def _rows() -> tuple[torch.Tensor, torch.Tensor]:
    """A row that routes to the lost experts and one that (unmasked) routes to none of them (every _setup has
    the same weights: seed 0)."""
    ref = _setup()[2]
    g = torch.Generator().manual_seed(3)
    hit = avoid = None
    with torch.no_grad():
        for _ in range(400):
            row = torch.randint(0, CFG.vocab_size, (1, 3), generator=g)
            ref(row)
            touches = bool(ref.expert_load()[:, 2:4].sum())
            hit = row if touches and hit is None else hit
            avoid = row if not touches and avoid is None else avoid
            if hit is not None and avoid is not None:
                return hit, avoid
    raise AssertionError("no row avoiding experts 2, 3 in 400 tries")


def _run(workers, parts):
    def run(indices, down):
        return [workers[i].forward_agreed(parts[i], 0, None, down) for i in indices]

    return run


def test_each_worker_masking_alone_mixes_a_response_and_the_agreement_does_not():
    dead, workers, ref = _setup()
    hit, avoid = _rows()
    with torch.no_grad():
        plain = ref(torch.cat([hit, avoid])).logits
        _set_mask(ref, LOST)
        want = ref(torch.cat([hit, avoid])).logits
        assert not torch.allclose(want[1], plain[1])  # top_p: the mask moves a row that chose no lost expert
        dead[0] = True
        # before: each worker widens on its own (ExpertMask.run), so only worker 0 masks
        alone = [w.mask.run(lambda w=w, p=p: w.model(p, StepContext.for_inference(0)).logits)
                 for w, p in zip(workers, (hit, avoid))]  # fmt: skip
    torch.testing.assert_close(alone[0], want[:1])
    torch.testing.assert_close(alone[1], plain[1:])  # the mixed response: row 1 unmasked
    assert workers[0].mask.pairs() != workers[1].mask.pairs()

    dead, workers, ref = _setup()
    _set_mask(ref, LOST)
    dead[0] = True
    out = forward_under_one_mask(_run(workers, [hit, avoid]), 2, FOUR, mask_mode=True)
    torch.testing.assert_close(out.logits, want)
    assert out.degraded == LOST == mask_pairs(FOUR, out.down) and DEAD_ACTOR in out.down
    assert out.rounds == 2  # worker 0 met the lost experts, then both ran under the widened mask
    assert [list(map(list, w.mask.pairs())) for w in workers] == [LOST, LOST]


def test_a_stale_mask_on_one_worker_is_spread_before_the_answer():
    """Worker 0 masked earlier (e.g. a generation step), worker 1 never met the dead actor: neither row reaches
    the lost experts now, yet the answer must not mix: worker 1 adopts the mask and runs again."""
    dead, workers, ref = _setup()
    _, avoid = _rows()
    dead[0] = True
    workers[0].failover.mark_down(DEAD_ACTOR, "UNAVAILABLE")
    workers[0].mask.adopt({})  # masks what the down actor leaves without a replica
    assert [list(p) for p in workers[0].mask.pairs()] == LOST
    calls = [m.dispatcher.calls for m in workers[1].model.moe_layers]
    out = forward_under_one_mask(_run(workers, [avoid, avoid]), 2, FOUR, mask_mode=True)
    _set_mask(ref, LOST)
    with torch.no_grad():
        want = ref(torch.cat([avoid, avoid])).logits
    torch.testing.assert_close(out.logits, want)
    assert out.degraded == LOST and out.rounds == 2
    assert [m.dispatcher.calls for m in workers[1].model.moe_layers] == [c + 2 for c in calls]  # ran twice
    assert [m.dispatcher.calls for m in workers[0].model.moe_layers] == [1, 1]  # ran once: its answer stood


def test_healthy_cluster_answers_in_one_round_unmasked():
    dead, workers, ref = _setup()
    hit, avoid = _rows()
    out = forward_under_one_mask(_run(workers, [hit, avoid]), 2, FOUR, mask_mode=True)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, ref(torch.cat([hit, avoid])).logits)
    assert out.degraded == [] and out.down == {} and out.rounds == 1


def test_fail_mode_raises_naming_the_actor_and_masks_nothing():
    dead, workers, ref = _setup(mask_mode=False)
    hit, avoid = _rows()
    dead[0] = True
    with pytest.raises(DataPlaneError, match=r"router worker 0, forward: .*actor 1 held the only replica"):
        forward_under_one_mask(_run(workers, [hit, avoid]), 2, FOUR, mask_mode=False)
    assert all(w.mask.pairs() == [] for w in workers)


def test_workers_that_never_agree_are_an_error_not_a_loop():
    def never(indices, down):  # a worker whose mask is not the one its down actors imply (placement changing)
        return [{"logits": torch.zeros(1, 2, 3), "masked": [[0, i]], "down": {1: "UNAVAILABLE"}} for i in indices]

    with pytest.raises(MaskDisagreement, match=r"did not settle on one expert mask in 6 rounds"):
        forward_under_one_mask(never, 2, FOUR, mask_mode=True)
