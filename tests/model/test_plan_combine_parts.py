"""DispatchPlan.combine_parts: combine over consecutive row blocks, bit-equal to combine of the joined rows."""

import pytest
import torch

from moe_runtime.model.plan import DispatchPlan
from moe_runtime.placement import Placement


@pytest.mark.parametrize("threads", [1, 2])
def test_parts_equal_combine_bit_for_bit(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        placement = Placement.contiguous(1, 16, 4)
        ids = torch.stack([torch.randperm(16, generator=g)[:3] for _ in range(200)])
        gates = torch.softmax(torch.randn(200, 3, generator=g), -1)
        plan = DispatchPlan.build(ids, placement, 0)
        y = torch.randn(plan.num_copies, 64, generator=g)
        want = plan.combine(y, gates)
        parts = [y[d.start : d.stop] for d in plan.destinations]
        assert len(parts) == 4
        assert torch.equal(plan.combine_parts(parts, gates), want)
        assert torch.equal(plan.combine_parts([y], gates), want)
        # bf16 rows: close, not bit-equal (CPU index_add accumulates reduced-precision rows differently in
        # pieces), which is why dispatch_combine takes this path for fp32 only
        torch.testing.assert_close(plan.combine_parts([p.to(torch.bfloat16) for p in parts], gates),
                                   plan.combine(y.to(torch.bfloat16), gates), atol=1e-2, rtol=2e-2)
    finally:
        torch.set_num_threads(old)


def test_parts_must_cover_every_copy():
    placement = Placement.contiguous(1, 4, 2)
    plan = DispatchPlan.build(torch.tensor([[1, 3], [0, 1], [2, 0]]), placement, 0)
    y = torch.randn(plan.num_copies, 5)
    with pytest.raises(ValueError, match="parts hold 4 rows: the plan has 6 token copies"):
        plan.combine_parts([y[:4]], torch.full((3, 2), 0.5))
