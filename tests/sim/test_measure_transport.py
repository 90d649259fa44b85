"""Dispatch round trips through the real data plane to a calibration server in another process."""

from __future__ import annotations

import torch

from moe_runtime.sim.measure_transport import measure_rpc


def test_rpc_round_trips_through_a_real_expert_server():
    codec = {"fixed_s": 0.0, "s_per_byte": 0.0}
    r = measure_rpc(64, torch.float32, codec, quick=True)
    assert len(r["rtt_s"]) == len(r["bytes"]) == 3 and all(t > 0 for t in r["rtt_s"])
    assert r["alpha_s"] > 0 and r["cpu_s"] >= 0 and r["bandwidth"] > 0 and r["stretch"] > 0
