"""The rebalance what-if (the scheduler's placement vs the static one), checked against computations of its own:
a case small enough to work out by hand, and on larger cases the placement it reports simulated directly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from moe_runtime.config import ModelConfig, SchedulerConfig
from moe_runtime.placement import Placement
from moe_runtime.sim.hardware import Link, load_table
from moe_runtime.sim.layout import Layout
from moe_runtime.sim.simulator import Simulator
from moe_runtime.sim.traces import RoutingTrace
from moe_runtime.sim.whatif import rebalance_whatif
from tests.sim.helpers import cost, gpu_table, zipf_exact

M = ModelConfig(preset="yuan-m32", num_layers=2, num_experts=16)


def test_one_hot_expert_on_two_gpus_worked_out_by_hand():
    """2 GPUs (a router worker and an expert actor each), 1 layer, 2 experts, top-1; every token of both
    workers goes to expert 0 (on GPU 0). Free links, so only compute counts, forward only.
    Static: both workers' requests (T rows each) queue on GPU 0: dense + 2 e(T) + head (worker 0's head waits
    for GPU 0 to finish worker 1's request). The scheduler gives expert 0 a second replica on actor 1 (GPU 1
    has a free slot), each replica takes T/2 rows of each worker: dense + 2 e(T/2) + head. Moving one copy of
    expert 0 costs its fp32 weights and two AdamW moments: 12 bytes x 3 d f parameters."""
    model = ModelConfig(preset="tiny", num_layers=1, num_experts=2, top_k=1)
    table = gpu_table(0.0, 1e30, compute=True, peak_flops=1e11, kernel_overhead_s=0.0)
    table = table.with_links(inter_node=Link(0.0, 1e9))  # the link a migration is timed on
    c = cost(table, model)
    sim = Simulator(c, Layout.colocated(2, 2), training=False)
    T = 4096
    counts = np.zeros((1, 2, 1, 2), dtype=np.int64)
    counts[..., 0] = T
    res = rebalance_whatif(sim, RoutingTrace(counts, top_k=1), cfg=SchedulerConfig(min_gain=0.0))

    dense, head = float(c.dense_time(T)), float(c.head_time(T))
    static = dense + 2 * float(c.expert_time(T)) + head
    rebalanced = dense + 2 * float(c.expert_time(T // 2)) + head
    assert res.changed and res.placement.replicas == (((0, 1), (1,)),)
    assert res.static_step_s == pytest.approx(static, rel=1e-6)
    assert res.rebalanced_step_s == pytest.approx(rebalanced, rel=1e-6)
    assert res.speedup == pytest.approx(static / rebalanced, rel=1e-6) and res.speedup > 1.3
    assert (res.static_imbalance, res.rebalanced_imbalance) == (2.0, 1.0)  # max / mean rows per actor
    one_copy = 12 * 3 * model.hidden_size * model.ffn_hidden_size
    assert res.bytes_to_move == one_copy and res.move_time_s == pytest.approx(one_copy / 1e9)
    json.dumps(res.to_dict())


def _copies_added(before: Placement, after: Placement) -> int:
    return sum(len(set(b) - set(a)) for ra, rb in zip(before.replicas, after.replicas) for a, b in zip(ra, rb))


def test_scheduler_placement_beats_static_on_zipf():
    sim = Simulator(cost(load_table("h100"), M, wire=2), Layout.colocated(8, 8))
    trace = sim.synthetic("zipf", steps=2, tokens_per_worker=2048, zipf_s=1.2, seed=1)
    res = rebalance_whatif(sim, trace, cfg=SchedulerConfig(min_gain=0.0))
    assert res.changed and res.placement.version == 1
    # the reported times are those of the placements, simulated step by step on the trace
    static = Placement.contiguous(2, 16, 8, actor_nodes=(0,) * 8)
    assert res.static_step_s == pytest.approx(np.mean([sim.run_step(trace.step(s), static).step_time_s
                                                       for s in range(2)]))  # fmt: skip
    assert res.rebalanced_step_s == pytest.approx(np.mean([sim.run_step(trace.step(s), res.placement).step_time_s
                                                           for s in range(2)]))  # fmt: skip
    assert res.rebalanced_imbalance < res.static_imbalance
    assert res.static_step_s / res.rebalanced_step_s > 1.2, res.to_dict()
    # capacities: ceil(E / A) + 1 slots per actor per layer; bytes: the copies added, each a whole expert state
    slots = math.ceil(16 / 8) + 1
    assert all(len(res.placement.shards_of(a)) <= slots * M.num_layers for a in range(8))
    assert res.bytes_to_move == _copies_added(static, res.placement) * 12 * 3 * M.hidden_size * M.ffn_hidden_size
    assert res.move_time_s == pytest.approx(res.bytes_to_move / (50e9 * 0.9))  # one H100 InfiniBand port


def test_replicas_cost_gradient_sync():
    # the policy balances tokens; every new replica also joins a gradient all-reduce, which the what-if counts:
    # with few tokens per GPU on slow links the sync growth can outweigh the balance gain
    sim = Simulator(cost(load_table("a100"), M, wire=2), Layout.colocated(8, 4))
    trace = sim.synthetic("zipf", steps=2, tokens_per_worker=1024, zipf_s=1.0)
    res = rebalance_whatif(sim, trace, cfg=SchedulerConfig())
    assert res.changed
    assert res.rebalanced["phases"]["forward_backward_s"] < res.static["phases"]["forward_backward_s"]
    assert res.rebalanced["phases"]["grad_sync_s"] > res.static["phases"]["grad_sync_s"]


def test_uniform_load_leaves_the_placement():
    sim = Simulator(cost(load_table("h100"), M, wire=2), Layout.colocated(8, 8))
    trace = zipf_exact(M, 0.0, 8, 2048)
    res = rebalance_whatif(sim, trace, cfg=SchedulerConfig(min_gain=0.05))
    assert not res.changed and res.speedup == 1.0 and res.bytes_to_move == 0
    assert res.static_step_s == res.rebalanced_step_s == sim.run_step(trace.step(0)).step_time_s
