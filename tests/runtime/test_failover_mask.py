"""transport.on_expert_failure = mask on a local cluster: after the only replica's actor is killed, forward() and
generate() answer, equal to an in-process model whose routers exclude the same experts, and say which (layer,
expert) pairs were masked; once the actor has rejoined the answers are unmasked again. (fail mode: the clear error
of test_failover.py's test_forward_without_a_replica_fails_naming_actor_layer_experts_then_rejoins.)"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from moe_runtime.generation.backend import LocalBackend
from moe_runtime.generation.byte_tokenizer import ByteTokenizer
from moe_runtime.generation.engine import Engine, encode_prompts
from moe_runtime.generation.sampling import SamplingParams
from moe_runtime.model.transformer import build_model
from tests.runtime.helpers import make_config, only_on
from tests.runtime.test_faults import _pid, _wait_dead

VICTIM = 1
PROBE = torch.randint(0, 264, (4, 32), generator=torch.Generator().manual_seed(7))  # tiny: vocab 264


@pytest.fixture(scope="module")
def masked2(ray_session, runtime_tmp):
    from moe_runtime.config import parse_config
    from moe_runtime.runtime.cluster import Cluster

    data = make_config(runtime_tmp / "mask", train={"checkpoint_every": 0}, expert_actors=2,
                       router_workers=1).model_dump(mode="json")  # fmt: skip
    data["transport"]["on_expert_failure"] = "mask"
    c = Cluster.start(parse_config(data))
    c.checkpoint(runtime_tmp / "mask" / "serve")  # of the current step: the lost shards come back from it
    yield c
    c.shutdown()


def _ref(c, masked: list[list[int]] = ()):
    model = build_model(c.cfg.model, c.cfg.train.seed).eval()  # the cluster's weights (it has not trained)
    set_mask(model, masked)
    return model


def set_mask(model, masked) -> None:
    for layer, moe in enumerate(model.moe_layers):
        dead = {e for la, e in masked if la == layer}
        moe.router.set_expert_alive([e not in dead for e in range(moe.router.num_experts)])


def _kill(c) -> int:
    victim = _pid(c.experts[VICTIM])
    os.kill(victim, signal.SIGKILL)
    _wait_dead(victim)
    return victim


def test_forward_with_the_only_replica_dead_masks_its_experts_and_says_so(masked2):
    c, probe = masked2, PROBE
    lost = only_on(c, VICTIM)
    assert lost, "actor 1 must hold experts with no other replica"
    with torch.no_grad():
        want_plain, want_masked = _ref(c)(probe).logits, _ref(c, lost)(probe).logits
    torch.testing.assert_close(c.forward(probe), want_plain, rtol=1e-5, atol=1e-6)
    assert c.last_degraded == []
    _kill(c)
    got = c.forward(probe)  # fail mode: UNAVAILABLE ... only replica of experts [...]
    torch.testing.assert_close(got, want_masked, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want_masked, want_plain, rtol=1e-5, atol=1e-6)
    assert c.last_degraded == lost
    c.wait_healed(120)  # the forward started the heal: the restarted actor reloads from the checkpoint
    status = c.status()
    assert status["healthy"], [a["health"] for a in status["expert_actors"]]
    assert status["degraded"] == [] and status["last_degraded"] == lost
    torch.testing.assert_close(c.forward(probe), want_plain, rtol=1e-5, atol=1e-6)  # the mask went with the heal
    assert c.last_degraded == []


def test_decode_with_the_only_replica_killed_mid_stream_continues_masked(masked2):
    from moe_runtime.runtime.generation_backend import RemoteBackend

    c = masked2
    c.wait_healed(120)
    lost = only_on(c, VICTIM)
    tok = ByteTokenizer()
    prompts = [tok.encode(p) for p in ("def __init__(self", "import os")]
    remote = RemoteBackend(c.workers[0], c.cfg.model)
    plain, masked = LocalBackend(_ref(c)), LocalBackend(model := _ref(c))
    rc, rl = remote.prefill(prompts, 16)
    (pc, _), (mc, ml) = plain.prefill(prompts, 16), masked.prefill(prompts, 16)
    torch.testing.assert_close(rl, ml, rtol=1e-5, atol=1e-6)
    _kill(c)  # the prefill is cached; the decode steps meet the dead actor
    set_mask(model, lost)
    for tokens in ([65, 66], [67, 68], [69, 70]):
        got, want, unmasked = remote.decode(rc, tokens), masked.decode(mc, tokens), plain.decode(pc, tokens)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(want, unmasked, rtol=1e-5, atol=1e-6)  # the mask changed the answer

    params = SamplingParams(8, temperature=1.0, seed=3)  # the actor is still down: generate() serves masked
    got = c.generate(prompts, params)
    assert c.last_degraded == lost
    want = Engine(LocalBackend(model), tok, ByteTokenizer.eod_id).generate(encode_prompts(prompts, tok), params)
    assert [g.new_token_ids for g in got] == [w.new_token_ids for w in want]
    c.wait_healed(120)  # generate() started the heal
    status = c.status()
    assert status["healthy"] and status["degraded"] == []
    c.generate(prompts, params)
    assert c.last_degraded == []
