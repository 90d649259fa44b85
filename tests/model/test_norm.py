import pytest
import torch

from moe_runtime.model.norm import RMSNorm


# widths that are not powers of two too: the fast path divides a sum by the width (what torch.mean does inside)
@pytest.mark.parametrize("shape", [(1, 1, 64), (8, 1, 64), (3, 37, 64), (5, 2048), (1, 1, 100), (4, 3, 96),
                                   (2, 7, 33)])
def test_inference_rms_norm_is_bit_identical_to_the_autograd_ops(shape):
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(shape) * 3
    with torch.inference_mode():
        fast = norm(x)
    explicit = norm(x.requires_grad_())  # grad mode: the explicit fp32 ops
    assert torch.equal(fast, explicit.detach())
    ref = x.detach() * torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.detach()
    assert torch.equal(fast, ref)


def test_low_precision_input_still_computes_in_fp32():
    norm = RMSNorm(16)
    x = torch.randn(4, 16).to(torch.bfloat16)
    with torch.no_grad():
        y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)),
                               rtol=1e-2, atol=1e-2)
