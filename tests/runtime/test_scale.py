"""Elastic expert actors (runtime/scale.py): scale 4 -> 5 -> 3 -> 4 between steps and while serving; the losses
equal the oracle's across the scale events and forward answers the same logits; too few GPUs is a clear error."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.runtime.ray_env import ClusterStartError


@pytest.mark.slow
def test_scale_up_and_down_keeps_the_oracle_losses(fresh4, oracle):
    c = fresh4
    losses = [c.train_step().loss for _ in range(2)]
    logits = c.forward(oracle.probe)
    try:
        up = c.scale(5)
        assert up.before == 4 and up.after == 5 and up.bytes_moved > 0
        assert len(c.experts) == 5 and c.placement.num_actors == 5 and c.status()["healthy"]
        assert all(c.placement.shards_of(a) for a in range(5))  # the new actor got experts
        torch.testing.assert_close(c.forward(oracle.probe), logits, rtol=1e-5, atol=1e-6)  # serving across it
        losses += [c.train_step().loss for _ in range(2)]
        down = c.scale(3)
        assert down.after == 3 and len(c.experts) == 3 and c.placement.num_actors == 3 and c.status()["healthy"]
        losses += [c.train_step().loss for _ in range(2)]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(oracle.losses), rtol=1e-4, atol=0)
        with pytest.raises(ClusterStartError, match="are free in the Ray cluster"):
            c.scale(100)
        assert len(c.experts) == 3 and c.status()["healthy"]  # a refused scale-up changes nothing
    finally:
        c.scale(4)  # the session cluster goes back to its shape
    assert len(c.experts) == 4 and c.status()["healthy"]
