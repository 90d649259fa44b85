"""The step simulator: analytic transfer cases, monotonicity, determinism of replay, layouts, host tables, speed.
(Its parts: test_queues.py, test_work.py, test_layout.py, test_gpu_cost.py, test_host_cost.py.)"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from moe_runtime.config import ModelConfig
from moe_runtime.placement import Placement
from moe_runtime.sim.hardware import Link, load_table
from moe_runtime.sim.layout import Layout
from moe_runtime.sim.simulator import Simulator
from moe_runtime.sim.traces import RoutingTrace, synthetic_trace
from tests.sim.helpers import TINY, cost, gpu_table, host_table, zipf_exact

# ----------------------------------------------------------------------------------------------- analytic cases

ALPHA, BW = 2e-5, 1e9


def _forward_only(layout: Layout, counts_cle: np.ndarray, table=None) -> tuple[float, float]:
    c = cost(table or gpu_table(ALPHA, BW))
    sim = Simulator(c, layout, training=False)
    res = sim.run_step(counts_cle)
    return res.step_time_s, c


def _counts(chunks: int, per_expert: list[int]) -> np.ndarray:
    return np.broadcast_to(np.array(per_expert), (chunks, TINY.num_layers, TINY.num_experts)).copy()


def test_one_flow_over_one_link_takes_alpha_plus_bytes_over_beta():
    # one worker, one actor, on different nodes: per layer one dispatch and one reply of the same size
    counts = _counts(1, [40, 0, 0, 0, 0, 0, 0, 0])
    step, c = _forward_only(Layout.separate(1, 1, gpus_per_node=1), counts)
    b = float(c.message_bytes(40))
    assert step == pytest.approx(TINY.num_layers * 2 * (ALPHA + b / BW), rel=1e-5)


def test_two_flows_sharing_a_link_take_twice_as_long():
    # worker egress shared by two flows (to two actors), and the replies share the worker's ingress
    counts = _counts(1, [40, 0, 0, 0, 40, 0, 0, 0])  # experts 0-3 on actor 0, 4-7 on actor 1
    step, c = _forward_only(Layout.separate(1, 2, gpus_per_node=1), counts)
    b = float(c.message_bytes(40))
    assert step == pytest.approx(TINY.num_layers * 2 * (ALPHA + 2 * b / BW), rel=1e-5)
    # two workers into one actor: its ingress is shared, then its egress
    counts2 = _counts(2, [40, 0, 0, 0, 0, 0, 0, 0])
    step2, _ = _forward_only(Layout.separate(2, 1, gpus_per_node=1), counts2)
    assert step2 == pytest.approx(step, rel=1e-5)


def test_link_classes_follow_the_topology():
    counts = _counts(1, [40, 0, 0, 0, 0, 0, 0, 0])
    slow_ib = gpu_table(ALPHA, BW).with_links(inter_node=Link(ALPHA, BW / 10))
    same_node, c = _forward_only(Layout.separate(1, 1, gpus_per_node=8), counts, slow_ib)
    other_node, _ = _forward_only(Layout.separate(1, 1, gpus_per_node=1), counts, slow_ib)
    b = float(c.message_bytes(40))
    assert same_node == pytest.approx(TINY.num_layers * 2 * (ALPHA + b / BW), rel=1e-5)
    assert other_node == pytest.approx(TINY.num_layers * 2 * (ALPHA + 10 * b / BW), rel=1e-5)


def test_expert_compute_queues_on_the_actor():
    # zero-cost links; two workers' requests to one actor are served one after the other
    table = gpu_table(0.0, 1e30, compute=True)
    c = cost(table)
    one = Simulator(c, Layout.separate(1, 1), training=False).run_step(_counts(1, [64, 0, 0, 0, 0, 0, 0, 0]))
    two = Simulator(c, Layout.separate(2, 1), training=False).run_step(_counts(2, [64, 0, 0, 0, 0, 0, 0, 0]))
    e, d = float(c.expert_time(64)), float(c.dense_time(32))
    assert d > e  # worker 0 is busy with its next dense layer while the actor serves worker 1
    # layer 0: worker 1 waits one expert job behind worker 0; later layers pipeline: it stays one job behind
    assert two.step_time_s - one.step_time_s == pytest.approx(e, rel=1e-4)
    slow_dense = cost(gpu_table(0.0, 1e30, compute=True, layer_overhead_s=0.0))
    one = Simulator(slow_dense, Layout.separate(1, 1), training=False).run_step(_counts(1, [64, 0, 0, 0, 0, 0, 0, 0]))
    two = Simulator(slow_dense, Layout.separate(2, 1), training=False).run_step(_counts(2, [64, 0, 0, 0, 0, 0, 0, 0]))
    e, d = float(slow_dense.expert_time(64)), float(slow_dense.dense_time(32))
    assert d < e  # now the actor is the bottleneck: every layer adds one expert job for worker 1
    assert two.step_time_s - one.step_time_s == pytest.approx(TINY.num_layers * e - (TINY.num_layers - 1) * d,
                                                              rel=1e-4)


# ----------------------------------------------------------------------------------------------- monotonicity

M2 = ModelConfig(preset="yuan-m32", num_layers=2)


def _gpu_sim(table=None, gpus: int = 16, training: bool = True) -> Simulator:
    return Simulator(cost(table or load_table("h100"), M2, wire=2), Layout.colocated(gpus, 8), training=training)


def test_more_skew_is_never_faster():
    sim = _gpu_sim()
    times = [sim.run_step(zipf_exact(M2, s, 16, 2048).step(0)).step_time_s for s in (0.0, 0.3, 0.6, 1.0, 1.5, 2.5)]
    assert all(b >= a for a, b in itertools.pairwise(times)), times
    assert times[-1] > 1.5 * times[0]


def test_more_bandwidth_is_never_slower():
    base = load_table("h100")
    trace = synthetic_trace("zipf", steps=1, workers=16, layers=2, experts=32, top_k=2, tokens_per_worker=2048,
                            zipf_s=1.0, seed=3)  # fmt: skip
    times = []
    for f in (0.25, 0.5, 1.0, 2.0, 4.0):
        links = {k: Link(v.alpha_s, v.bandwidth * f) for k, v in base.links.items()}
        times.append(_gpu_sim(base.with_links(**links)).run_step(trace.step(0)).step_time_s)
    assert all(b <= a for a, b in itertools.pairwise(times)), times
    assert times[0] > times[-1]


# ----------------------------------------------------------------------------------------------- replay, outputs


def test_replay_is_deterministic(tmp_path):
    sim = _gpu_sim()
    trace = sim.synthetic("drift", steps=2, tokens_per_worker=1024, seed=5)
    first = [r.to_dict() for r in sim.run(trace)]
    back = RoutingTrace.load_file(trace.save(tmp_path / "t.npz"))
    again = [r.to_dict() for r in sim.run(back)]
    assert first == again
    assert [r.to_dict() for r in _gpu_sim().run(back)] == first  # a fresh simulator too


def test_result_fields_and_timeline():
    sim = _gpu_sim(gpus=16)
    res = sim.run_step(sim.synthetic("uniform", tokens_per_worker=1024).step(0), record_timeline=True)
    assert len(res.per_layer_s) == 2 and all(x > 0 for x in res.per_layer_s)
    assert len(res.gpu_busy_fraction) == 16 and all(0 < x <= 1 for x in res.gpu_busy_fraction)
    tokens, k, d = 16 * 1024, 2, M2.hidden_size
    # dispatch + reply, forward + backward, 2 layers, bf16: headers aside
    assert res.bytes_moved_per_step == pytest.approx(4 * 2 * tokens * k * d * 2, rel=0.01)
    assert res.bytes_by_class["inter_node"] > 0 and res.bytes_by_class["intra_node"] > 0
    assert 1.0 <= res.imbalance < 1.3
    assert res.phases["grad_sync_s"] > 0 and res.phases["optimizer_s"] > 0
    kinds = set(res.timeline.kind)
    assert {"dense", "experts", "head", "experts_bwd", "dense_bwd"} <= kinds
    assert max(e for _, _, e, _, _ in res.timeline.rows()) <= res.step_time_s + 1e-9


def test_separate_layout_and_bad_inputs():
    c = cost(load_table("h100"), M2, wire=2)
    sim = Simulator(c, Layout.separate(4, 8, gpus_per_node=4))
    res = sim.run_step(sim.synthetic("zipf", tokens_per_worker=512).step(0))
    assert res.layout == "separate" and res.devices == 12 and res.step_time_s > 0
    with pytest.raises(ValueError, match="counts have shape"):
        sim.run_step(np.zeros((3, 2, 32), dtype=int))
    with pytest.raises(ValueError, match="placement is"):
        sim.run_step(np.zeros((4, 2, 32), dtype=int), Placement.contiguous(2, 32, 4))


def test_host_table_shares_the_cores():
    # 4 actors each computing at the same time: 1 core serialises them, 4 cores run them together
    counts = _counts(1, [100, 0, 100, 0, 100, 0, 100, 0])
    lay = Layout.separate(1, 4, gpus_per_node=5)
    t1 = Simulator(cost(host_table(cores=1, expert_s_per_row=1e-3)), lay, training=False).run_step(counts)
    t4 = Simulator(cost(host_table(cores=4, expert_s_per_row=1e-3)), lay, training=False).run_step(counts)
    assert t1.layout == "host"
    expert = 1e-5 + 100 * 1e-3
    assert t1.step_time_s - t4.step_time_s == pytest.approx(TINY.num_layers * 3 * expert, rel=0.05)
    tr = Simulator(cost(host_table(cores=4, expert_s_per_row=1e-3)), lay).run_step(counts)  # + backward, sync, optimizer
    assert tr.phases["optimizer_s"] > 0 and tr.step_time_s > 2.5 * t4.step_time_s


def test_256_gpu_24_layer_step_is_fast():
    m = ModelConfig(preset="yuan-m32")
    sim = Simulator(cost(load_table("h100"), m, wire=2), Layout.colocated(256, 8))
    trace = sim.synthetic("zipf", tokens_per_worker=4096)
    t0, c0 = time.perf_counter(), time.process_time()
    res = sim.run_step(trace.step(0))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"\n256-GPU 24-layer training step simulated in {wall:.3f} s wall ({cpu:.3f} s CPU): "
          f"{res.step_time_s * 1e3:.1f} ms simulated, {res.messages_per_step} messages")  # fmt: skip
    assert res.messages_per_step > 1_000_000
    assert wall < 5.0  # goal < 1 s; loose because the machine is shared
