import pytest
import torch

from moe_runtime.model.plan import DispatchPlan
from moe_runtime.placement import Placement


def test_plan_sorts_by_actor_then_expert_and_inverts():
    placement = Placement.contiguous(1, 8, 4)  # experts 2a, 2a+1 on actor a
    ids = torch.tensor([[7, 0], [3, 2], [0, 5], [6, 1]])
    plan = DispatchPlan.build(ids, placement, layer=0)
    assert [(s.actor, s.expert, s.count) for s in plan.segments] == [
        (0, 0, 2), (0, 1, 1), (1, 2, 1), (1, 3, 1), (2, 5, 1), (3, 6, 1), (3, 7, 1)]
    flat = ids.reshape(-1)
    assert flat[plan.order].tolist() == [0, 0, 1, 2, 3, 5, 6, 7]
    assert torch.equal(plan.token_index, plan.order // 2)
    assert sorted(plan.order.tolist()) == list(range(8))  # a permutation
    assert [d.actor for d in plan.destinations] == [0, 1, 2, 3]
    assert plan.actor_rows(4) == [3, 2, 1, 2]
    assert plan.expert_counts.tolist() == [2, 1, 1, 1, 0, 1, 1, 1]


def test_gather_combine_is_weighted_sum():
    placement = Placement.contiguous(1, 4, 2)
    ids = torch.tensor([[1, 3], [0, 1], [2, 0]])
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]])
    plan = DispatchPlan.build(ids, placement, 0)
    x = torch.randn(3, 5)
    # identity experts: combine(gather(x)) = sum of gates * x = x
    torch.testing.assert_close(plan.combine(plan.gather(x), w), x)


def test_replicas_split_evenly_in_token_order():
    placement = Placement(3, (((0, 2), (1,)),))
    ids = torch.tensor([[0], [0], [0], [1], [0], [0]])
    plan = DispatchPlan.build(ids, placement, 0)
    segs = [(s.actor, s.expert, s.count) for s in plan.segments]
    assert segs == [(0, 0, 3), (1, 1, 1), (2, 0, 2)]
    assert plan.order.tolist() == [0, 1, 2, 3, 4, 5]


def test_bad_inputs_are_named():
    placement = Placement.contiguous(2, 4, 2)
    with pytest.raises(ValueError, match=r"expert_ids out of range \[0, 4\): min 0, max 4"):
        DispatchPlan.build(torch.tensor([[0, 4]]), placement, 0)
    with pytest.raises(ValueError, match="layer = 2: placement has 2 layers"):
        DispatchPlan.build(torch.tensor([[0, 1]]), placement, 2)
    with pytest.raises(ValueError, match=r"expected \[tokens, top_k\]"):
        DispatchPlan.build(torch.tensor([0, 1]), placement, 0)


def _general_plan(ids, placement, layer, monkeypatch):
    import moe_runtime.model.plan as plan_module

    with monkeypatch.context() as m:
        m.setattr(plan_module, "SMALL_PLAN_COPIES", -1)  # force the tensor path
        return DispatchPlan.build(ids, placement, layer)


@pytest.mark.parametrize("seed", range(40))
def test_small_plan_from_lists_equals_the_tensor_path(seed, monkeypatch):
    """Decode steps build plans from Python lists (`_build_small`): the same plan, field for field."""
    import moe_runtime.model.plan as plan_module

    g = torch.Generator().manual_seed(seed)
    placement = Placement(3, (((0, 2), (1,), (2,), (0, 1, 2), (1,), (0,)),))  # replicated experts 0 and 3
    k = 1 + seed % 3
    tokens = int(torch.randint(1, plan_module.SMALL_PLAN_COPIES // k + 1, (), generator=g))
    ids = torch.randint(0, 6, (tokens, k), generator=g)
    small, general = DispatchPlan.build(ids, placement, 0), _general_plan(ids, placement, 0, monkeypatch)
    assert small.segments == general.segments
    for name in ("order", "token_index", "expert_counts"):
        a, b = getattr(small, name), getattr(general, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (small.num_tokens, small.top_k, small.num_experts) == (general.num_tokens, general.top_k, 6)


def test_small_plan_rejects_out_of_range_ids():
    placement = Placement.contiguous(1, 4, 2)
    with pytest.raises(ValueError, match=r"out of range \[0, 4\): min 0, max 4"):
        DispatchPlan.build(torch.tensor([[0, 4]]), placement, 0)
