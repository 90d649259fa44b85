"""model.expert_weight_dtype = bfloat16: the in-process model keeps its experts in bf16 and computes in fp32, one
expert converted at a time; its logits are the fp32 model's on the same (bf16-rounded) weights; training refuses
it with an error naming the field."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.config import ModelConfig, RuntimeConfig
from moe_runtime.model.transformer import build_model
from moe_runtime.model.weight_storage import ComputePairs, check_trainable, stored_swiglu_loop
from moe_runtime.model.experts import grouped_swiglu_loop


def _pair_models():
    bf = build_model(ModelConfig(preset="tiny", expert_weight_dtype="bfloat16"), seed=0)
    fp = build_model(ModelConfig(preset="tiny"), seed=0)
    fp.load_state_dict({k: v.float() for k, v in bf.state_dict().items()})
    return bf, fp


def test_bf16_experts_are_stored_in_bf16_and_give_the_fp32_logits_of_the_rounded_weights():
    bf, fp = _pair_models()
    stacks = [p for n, p in bf.named_parameters() if ".experts." in n]
    assert stacks and all(p.dtype == torch.bfloat16 for p in stacks)
    assert all(p.dtype == torch.float32 for n, p in bf.named_parameters() if ".experts." not in n)
    ids = torch.randint(0, 264, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = bf(ids).logits, fp(ids).logits
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)
        one = torch.tensor([[3]])  # batch-1 decode size: LocalDispatcher's few-segment path
        torch.testing.assert_close(bf(one).logits, fp(one).logits)


def test_stored_loop_converts_per_expert_and_equals_the_loop_path():
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(4, 8, 12, generator=g), torch.randn(4, 6, 8, generator=g)
    x = torch.randn(7, 8, generator=g)
    counts, ids = [3, 0, 4], [2, 1, 0]
    got = stored_swiglu_loop(x, counts, w1.bfloat16(), w2.bfloat16(), ids)
    want = grouped_swiglu_loop(x, counts, w1.bfloat16().float(), w2.bfloat16().float(), ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="counts sum to 6"):
        stored_swiglu_loop(x, [3, 3], w1.bfloat16(), w2.bfloat16())
    pairs = ComputePairs([(w1[0].bfloat16(), w2[0].bfloat16())], torch.float32)
    assert len(pairs) == 1 and pairs[0][0].dtype == torch.float32
    same = ComputePairs([(w1[0], w2[0])], torch.float32)
    assert same[0][0] is w1[0] or same[0][0].data_ptr() == w1[0].data_ptr()  # no copy when dtypes agree


def test_training_refuses_bf16_storage_naming_the_field():
    from moe_runtime.training import InProcessTrainer

    cfg = RuntimeConfig(model=ModelConfig(preset="tiny", expert_weight_dtype="bfloat16"))
    with pytest.raises(ValueError, match="model.expert_weight_dtype = 'bfloat16'.*training needs 'float32'"):
        check_trainable(cfg.model)
    with pytest.raises(ValueError, match="expert_weight_dtype"):
        InProcessTrainer(cfg)
    with pytest.raises(ValueError, match="expert_weight_dtype"):
        ModelConfig(preset="tiny", expert_weight_dtype="float16")
