"""codec.encode_answer: the server's reply encoder writes exactly the bytes encode_frame writes for it."""

import pytest
import torch

from moe_runtime.dispatch.codec import decode_expected, decode_frame, encode_answer, encode_frame, expected_frame
from moe_runtime.dispatch.envelope import envelope_prefix, unwrap_frame


@pytest.mark.parametrize("wire", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows_by_expert", [[1], [3, 0, 5], [0]])
def test_answer_bytes_equal_encode_frame(wire, rows_by_expert):
    experts = [4, 1, 7][: len(rows_by_expert)]
    rows = sum(rows_by_expert)
    x = torch.randn(rows, 24)
    request = encode_frame("dispatch", layer=2, step=9, mb=1, pv=3, experts=experts, counts=rows_by_expert,
                           tensors={"x": x}, wire_dtype=wire, meta={"src": 1, "save": False})  # fmt: skip
    h = decode_frame(request, out_dtype=None).header
    y = torch.randn(rows, 24)  # fp32 from the backend: cast to the wire dtype, as encode_frame does
    want = encode_frame("result", layer=h.layer, step=h.step, mb=h.mb, pv=h.pv, experts=h.experts, counts=h.counts,
                        tensors={"y": y}, wire_dtype=wire, lead=envelope_prefix)  # fmt: skip
    got = encode_answer("result", h, "y", y, wire, lead=envelope_prefix)
    assert got == want
    assert encode_answer("grad", h, "dx", y, wire) == encode_frame(
        "grad", layer=2, step=9, mb=1, pv=3, experts=experts, counts=rows_by_expert, tensors={"dx": y}, wire_dtype=wire)
    exp = expected_frame("result", layer=2, step=9, mb=1, pv=3, experts=experts, counts=rows_by_expert, name="y",
                         dtype=wire, shape=(rows, 24))  # fmt: skip
    view = decode_expected(unwrap_frame(got), exp)  # the client's one-comparison check accepts it
    assert view is not None and torch.equal(view, y.to(wire))


def test_answer_detaches_and_makes_contiguous():
    h = decode_frame(encode_frame("dispatch", layer=0, step=0, mb=0, pv=0, experts=[0], counts=[4],
                                  tensors={"x": torch.zeros(4, 8)})).header  # fmt: skip
    w = torch.randn(8, 4, requires_grad=True)
    y = (w * 2).t()  # requires grad and is not contiguous
    got = decode_frame(encode_answer("result", h, "y", y, torch.float32), out_dtype=None).tensors["y"]
    assert torch.equal(got, y.detach())
