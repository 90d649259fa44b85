"""Which parties a fault caught past a deadline (runtime/hung_parties.py), and what recovery does with them."""

from __future__ import annotations

import pickle

import grpc
import pytest
import ray.exceptions

from moe_runtime.dispatch.client import ExpertCallError
from moe_runtime.records import ActorInfo
from moe_runtime.runtime import hung_parties
from moe_runtime.runtime.hangs import get_with_peers
from moe_runtime.runtime.router_worker import DataPlaneError


def _info(index: int) -> ActorInfo:
    return ActorInfo(index=index, pid=100 + index, node_id="n", address=f"127.0.0.1:{5000 + index}", gpu_ids=(),
                     device="cpu", shards=(), placement_version=0)  # fmt: skip


INFOS = [_info(i) for i in range(3)]


@ray.remote
def _sleepy(s: float) -> float:
    import time

    time.sleep(s)
    return s


def _call_error(index: int, code: grpc.StatusCode) -> ExpertCallError:
    return ExpertCallError(INFOS[index].address, "Dispatch", 0, 3, code, "boom")


def test_a_deadline_names_the_expert_at_that_address():
    assert hung_parties.from_fault(_call_error(2, grpc.StatusCode.DEADLINE_EXCEEDED), INFOS) == {"expert actor 2"}


def test_a_dead_server_is_not_called_hung():
    assert hung_parties.from_fault(_call_error(2, grpc.StatusCode.UNAVAILABLE), INFOS) == set()
    assert hung_parties.from_fault(RuntimeError("expert actor 1 died"), INFOS) == set()


def test_the_address_crosses_ray_in_a_data_plane_error():
    late = DataPlaneError.of("router worker 0, step 3", _call_error(1, grpc.StatusCode.DEADLINE_EXCEEDED))
    back = pickle.loads(pickle.dumps(late))
    assert (type(back), str(back), back.hung_address) == (DataPlaneError, str(late), INFOS[1].address)
    wrapped = ray.exceptions.RayTaskError("forward_backward", "tb", back)  # what the driver gets
    assert hung_parties.from_fault(wrapped, INFOS) == {"expert actor 1"}
    dead = DataPlaneError.of("router worker 0, step 3", _call_error(1, grpc.StatusCode.UNAVAILABLE))
    assert dead.hung_address is None and hung_parties.from_fault(dead, INFOS) == set()


def test_an_address_of_no_known_actor_names_nobody():
    err = ExpertCallError("10.0.0.9:1", "Dispatch", 0, 3, grpc.StatusCode.DEADLINE_EXCEEDED, "late")
    assert hung_parties.from_fault(err, INFOS) == set()


def test_a_cause_chain_is_followed():
    try:
        try:
            raise _call_error(0, grpc.StatusCode.DEADLINE_EXCEEDED)
        except ExpertCallError as inner:
            raise RuntimeError("step 3 failed") from inner
    except RuntimeError as outer:
        assert hung_parties.from_fault(outer, INFOS) == {"expert actor 0"}


def test_a_straggler_timeout_names_the_late_workers(ray_session):
    refs = [_sleepy.remote(0.0), _sleepy.remote(30.0)]
    with pytest.raises(ray.exceptions.GetTimeoutError) as caught:
        get_with_peers(refs, 60.0, 0.5, "step 3 forward/backward", ["router worker 0", "router worker 1"])
    ray.cancel(refs[1], force=True)
    assert "router worker 1" in str(caught.value)
    assert hung_parties.from_fault(caught.value, INFOS) == {"router worker 1"}


def test_a_forward_names_deadline_downs_and_hung_workers_only():
    down = {0: "DEADLINE_EXCEEDED: no reply within the deadline", 1: "UNAVAILABLE: connection refused"}
    lost = {0: "no answer within 3 s: hung", 1: "RayActorError"}
    assert hung_parties.from_forward(down, lost) == {"expert actor 0", "router worker 0"}


def test_a_party_restarted_since_it_was_caught_is_not_hung_any_more():
    caught = {"expert actor 0": 100, "expert actor 1": 101, "router worker 0": None}
    now = {"expert actor 0": 100, "expert actor 1": 555, "router worker 0": 7}
    assert hung_parties.still_hung(caught, now) == {"expert actor 0"}


def test_no_finished_peer_names_nobody(ray_session):
    """All late, none done: no peer shows the work could be done in time (e.g. all wait on one stopped expert)."""

    refs = [_sleepy.remote(30.0), _sleepy.remote(30.0)]
    with pytest.raises(ray.exceptions.GetTimeoutError) as caught:
        get_with_peers(refs, 0.5, 0.2, "step 3 forward/backward", ["router worker 0", "router worker 1"])
    for ref in refs:
        ray.cancel(ref, force=True)
    assert hung_parties.from_fault(caught.value, INFOS) == set()
