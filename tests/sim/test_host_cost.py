"""The host cost model: measured points interpolated, the measured all-reduce, the local cluster's layout."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moe_runtime.config import ModelConfig, parse_config
from moe_runtime.sim.hardware import Link, scale_host_table
from moe_runtime.sim.host_cost import HostCostModel
from tests.sim.helpers import host_table


def test_host_costs_interpolate_the_measured_points():
    """Between measured points the cost is piecewise linear through them (a line through all of them misses the
    small-row expert times); beyond the last point it grows by the fitted slope; another model size falls back
    to the FLOP-scaled lines."""
    t = host_table(cores=2)
    ex = dict(t.measured["expert"], rows=[1, 4, 16], times_s=[1e-4, 2e-4, 1e-3], bwd_times_s=[3e-4, 5e-4, 2e-3],
              s_per_row=5e-5, bwd_s_per_row=1e-4)  # fmt: skip
    de = dict(t.measured["dense"], tokens=[32, 64], times_s=[1e-3, 3e-3], bwd_times_s=[2e-3, 7e-3], s_per_token=2e-5)
    measured = dict(t.measured, expert=ex, dense=de)
    tiny = ModelConfig(preset="tiny")
    table = dataclasses.replace(t, measured=dict(measured, model={"hidden_size": tiny.hidden_size,
                                                                  "ffn_hidden_size": tiny.ffn_hidden_size}))  # fmt: skip
    c = HostCostModel.build(table, tiny, 32, 4)
    got = c.expert_time(np.array([0, 1, 2, 4, 10, 16, 20]))
    np.testing.assert_allclose(got, [0, 1e-4, 1e-4 + 1e-4 / 3, 2e-4, 6e-4, 1e-3, 1e-3 + 4 * 5e-5])
    np.testing.assert_allclose(c.expert_time(np.array([10]), backward=True), [1.25e-3])
    np.testing.assert_allclose(c.dense_time(np.array([16, 48, 64, 74])), [5e-4, 2e-3, 3e-3, 3e-3 + 10 * 2e-5])
    np.testing.assert_allclose(c.dense_bwd_time(np.array([48])), [4.5e-3])
    doubled = HostCostModel.build(scale_host_table(table, 2.0), tiny, 32, 4)
    np.testing.assert_allclose(doubled.expert_time(np.array([10])), [1.2e-3])
    small = HostCostModel.build(table, ModelConfig(preset="small"), 32, 4)  # other size: the scaled line
    assert small.expert_curve is None
    assert small.expert_time(np.array([10]))[0] == pytest.approx(small.expert_fixed_s + 10 * small.expert_s_per_row)


def test_host_sync_links_and_layout():
    t = host_table(cores=2)
    tiny = ModelConfig(preset="tiny")
    c = HostCostModel.build(t, tiny, 32, 4)
    loop = t.links["loopback"]
    assert c.dense_sync_link(False) == c.replica_sync_link(False) == loop  # no measured all-reduce: loopback
    measured = HostCostModel.build(dataclasses.replace(t, measured={**t.measured,
                                                                    "allreduce": {"alpha_s": 1e-4, "bandwidth": 1e9}}),
                                   tiny, 32, 4)  # fmt: skip
    assert measured.dense_sync_link(False) == Link(1e-4, 1e9)  # the router workers' gloo ring, as measured
    assert measured.replica_sync_link(False) == loop
    cfg = parse_config({"cluster": {"num_gpus": 4, "expert_actors": 4, "router_workers": 2}})
    lay = c.layout_of(cfg)  # the config's local cluster on this machine
    assert (lay.num_workers, lay.num_actors, lay.num_nodes) == (2, 4, 1) and c.layout_name(lay) == "host"
