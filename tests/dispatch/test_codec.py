import math
import re
import warnings

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_runtime.dispatch.codec import (
    ALIGNMENT,
    FORMAT_VERSION,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_NAME_LEN,
    Frame,
    FrameError,
    FrameHeader,
    TensorSpec,
    decode_frame,
    encode_frame,
    frame_nbytes_upper_bound,
)

FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------------
# helpers: an independent writer of the wire layout, so malformed frames can be built by hand


def assemble(header_obj, buffers=(), *, header_bytes=None, magic=MAGIC):
    """prefix + msgpack header + each buffer at the next 64-byte boundary (the documented layout)."""
    hb = msgpack.packb(header_obj, use_bin_type=True) if header_bytes is None else header_bytes
    out = bytearray(magic + len(hb).to_bytes(4, "little") + hb)
    for b in buffers:
        out += bytes(-len(out) % ALIGNMENT)
        out += b
    return bytes(out)


def good_header(rows=12, hidden=4, **over):
    h = {
        "v": 1, "kind": "dispatch", "layer": 1, "step": 5, "mb": 0, "pv": 2,
        "experts": [3, 4, 7], "counts": [5, 4, rows - 9],
        "tensors": [{"name": "x", "dtype": "float32", "shape": [rows, hidden], "nbytes": rows * hidden * 4}],
    }  # fmt: skip
    h.update(over)
    return h


def good_payload(rows=12, hidden=4):
    return torch.arange(rows * hidden, dtype=torch.float32).numpy().tobytes()


def spec(**over):
    s = {"name": "x", "dtype": "float32", "shape": [12, 4], "nbytes": 192}
    s.update(over)
    return s


def bits(t):
    """Integer view of a tensor's bytes, for bit-exact comparison (NaN payloads, -0.0)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def sample_frame():
    x = torch.randn(12, 8)
    idx = torch.arange(12, dtype=torch.int64)
    return encode_frame(
        "dispatch", layer=3, step=41, mb=1, pv=7, experts=[2, 5, 9], counts=[4, 0, 8],
        tensors={"x": x, "rows": idx}, wire_dtype=torch.bfloat16, meta={"seq": 17, "tag": "fw", "w": [1, 2]},
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# round trips


def _values(dtype, shape):
    if dtype.is_floating_point:
        t = torch.randn(shape).to(dtype)
        flat = t.view(-1)
        flat[:4] = torch.tensor([float("inf"), float("-inf"), -0.0, float("nan")], dtype=dtype)
        return t
    return torch.randint(-(2**31), 2**31 - 1, shape, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32])
def test_round_trip_each_dtype_is_bit_exact(dtype):
    x = _values(dtype, (9, 5))
    extra = _values(dtype, (2, 3, 4))
    buf = encode_frame(
        "result", layer=2, step=3, mb=4, pv=5, experts=[11, 1], counts=[6, 3],
        tensors={"out": x, "extra": extra}, meta={"k": 1.5, "none": None, "flags": [True, "a"]},
    )  # fmt: skip
    assert isinstance(buf, bytes)
    f = decode_frame(buf, out_dtype=None, expected_kind="result", hosted={(2, 11), (2, 1)})
    assert isinstance(f, Frame)
    assert f.header == FrameHeader(
        v=FORMAT_VERSION, kind="result", layer=2, step=3, mb=4, pv=5, experts=(11, 1), counts=(6, 3),
        tensors=(
            TensorSpec("out", str(dtype).removeprefix("torch."), (9, 5), x.nbytes),
            TensorSpec("extra", str(dtype).removeprefix("torch."), (2, 3, 4), extra.nbytes),
        ),
        meta={"k": 1.5, "none": None, "flags": [True, "a"]},
    )  # fmt: skip
    assert f.header.rows == 9
    assert list(f.tensors) == ["out", "extra"]
    for name, ref in [("out", x), ("extra", extra)]:
        got = f.tensors[name]
        assert got.dtype == dtype and got.shape == ref.shape
        assert torch.equal(bits(got), bits(ref))


def test_default_out_dtype_upcasts_half_wire_to_fp32_and_leaves_ints():
    x = torch.randn(6, 16)
    idx = torch.tensor([5, 4, 3, 2, 1, 0], dtype=torch.int32)
    for wire, tol in [(torch.bfloat16, 2**-8), (torch.float16, 2**-11)]:
        buf = encode_frame("dispatch", layer=0, step=0, mb=0, pv=0, experts=[0], counts=[6],
                           tensors={"x": x, "idx": idx}, wire_dtype=wire)  # fmt: skip
        f = decode_frame(buf)
        assert f.header.tensors[0].dtype == str(wire).removeprefix("torch.")
        assert f.header.tensors[1].dtype == "int32"  # wire_dtype only applies to floating tensors
        out = f.tensors["x"]
        assert out.dtype == torch.float32
        assert torch.equal(out, x.to(wire).float())  # exactly the rounded values
        assert bool(((out - x).abs() <= tol * x.abs() + 1e-7).all())  # half an ulp (+ fp16 subnormals)
        assert not torch.equal(out, x)  # the wire really is narrower
        assert torch.equal(f.tensors["idx"], idx)
        assert out.is_contiguous()
        out.add_(1.0)  # converted tensors are fresh, writable memory


def test_encode_takes_noncontiguous_grad_and_index_inputs():
    base = torch.randn(8, 10, requires_grad=True)
    x = base.t()[:, :8] * 2  # non-contiguous, part of an autograd graph
    buf = encode_frame("backward", layer=0, step=1, mb=2, pv=3, experts=np.array([4, 1]),
                       counts=torch.tensor([7, 3]), tensors={"g": x})  # fmt: skip
    f = decode_frame(buf)
    assert f.header.experts == (4, 1) and f.header.counts == (7, 3)
    assert torch.equal(f.tensors["g"], x.detach())
    assert not f.tensors["g"].requires_grad


def test_empty_frames_round_trip():
    buf = encode_frame("dispatch", layer=0, step=0, mb=0, pv=0, experts=[], counts=[], tensors={})
    f = decode_frame(buf)
    assert f.tensors == {} and f.header.rows == 0 and len(buf) == 8 + int.from_bytes(buf[4:8], "little")
    buf = encode_frame("dispatch", layer=0, step=0, mb=0, pv=0, experts=[3], counts=[0],
                       tensors={"x": torch.empty(0, 8), "s": torch.tensor(2.5)})  # fmt: skip
    f = decode_frame(buf)
    assert f.tensors["x"].shape == (0, 8) and f.tensors["s"].shape == () and f.tensors["s"].item() == 2.5


def test_wire_layout_is_documented_one():
    x = torch.randn(5, 3)
    idx = torch.arange(7)
    buf = encode_frame(
        "grad", layer=1, step=2, mb=3, pv=4, experts=[1], counts=[5], tensors={"x": x, "i": idx}
    )
    assert buf[:4] == b"MOEF"
    hl = int.from_bytes(buf[4:8], "little")
    hdr = msgpack.unpackb(buf[8 : 8 + hl])
    assert hdr["v"] == 1 and hdr["kind"] == "grad" and hdr["tensors"][1] == {
        "name": "i", "dtype": "int64", "shape": [7], "nbytes": 56}  # fmt: skip
    off0 = -(-(8 + hl) // 64) * 64
    off1 = -(-(off0 + 60) // 64) * 64
    assert buf[off0 : off0 + 60] == x.numpy().tobytes()
    assert buf[off1:] == idx.numpy().tobytes()
    assert buf == assemble(hdr, [x.numpy().tobytes(), idx.numpy().tobytes()])


# ---------------------------------------------------------------------------------------------------
# zero copy


def test_decode_of_bytes_is_zero_copy_and_aligned():
    buf = sample_frame()
    base = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    f = decode_frame(buf, out_dtype=None)
    for name, t in f.tensors.items():
        ptr = t.data_ptr()
        assert base <= ptr and ptr + t.nbytes <= base + len(buf), name
        assert (ptr - base) % ALIGNMENT == 0
        assert ptr % 16 == 0
    # with the default out_dtype the bf16 payload is converted (a copy) but the int64 tensor stays a view
    f = decode_frame(buf)
    assert not base <= f.tensors["x"].data_ptr() < base + len(buf)
    assert base <= f.tensors["rows"].data_ptr() < base + len(buf)


def test_decode_of_bytearray_and_memoryview_aliases_the_buffer():
    buf = bytearray(sample_frame())
    f = decode_frame(buf, out_dtype=None)
    t = f.tensors["rows"]
    off = t.data_ptr() - np.frombuffer(buf, dtype=np.uint8).ctypes.data
    buf[off : off + 8] = (1234).to_bytes(8, "little")
    assert t[0].item() == 1234
    # a frame inside a bigger receive buffer, via a memoryview slice
    big = bytearray(100) + buf + bytearray(50)
    f2 = decode_frame(memoryview(big)[100 : 100 + len(buf)], out_dtype=None)
    assert torch.equal(f2.tensors["rows"], t)
    # a memoryview of another item format is read as bytes
    assert len(buf) % 4 == 0
    f3 = decode_frame(memoryview(bytes(buf)).cast("I"), out_dtype=None)
    assert f3.header.step == 41 and torch.equal(f3.tensors["x"], f.tensors["x"])
    with pytest.raises(FrameError, match="not C-contiguous"):
        decode_frame(memoryview(bytes(buf))[::2])


def test_read_only_decode_emits_no_warning():
    buf = sample_frame()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            decode_frame(buf, out_dtype=None)


# ---------------------------------------------------------------------------------------------------
# validation: every problem is a FrameError naming field, value and expectation


def _hdr(**over):
    return assemble(good_header(**over), [good_payload()])


BAD_FRAMES = [
    ("magic", assemble(good_header(), [good_payload()], magic=b"MOEX"), "frame magic = b'MOEX': expected b'MOEF'"),
    ("short", b"MOEF\x01", "frame is 5 bytes: too short for the 8-byte prefix"),
    ("header_len", b"MOEF" + (500).to_bytes(4, "little") + b"\x80" * 20,
     "header length = 500: only 20 bytes follow the prefix (truncated frame)"),
    ("header_cap", b"MOEF" + (MAX_HEADER_BYTES + 1).to_bytes(4, "little"),
     f"header length = {MAX_HEADER_BYTES + 1}: exceeds MAX_HEADER_BYTES"),
    ("not_msgpack", assemble(None, header_bytes=b"\xc1\xc1\xc1"), "header (3 bytes) is not valid msgpack"),
    ("extra_data", assemble(None, header_bytes=b"\x80\x80"), "header (2 bytes) is not valid msgpack: ExtraData"),
    # declared lengths far beyond the header: msgpack must refuse before allocating
    ("huge_array", assemble(None, header_bytes=b"\xdd\xff\xff\xff\xff"), "header (5 bytes) is not valid msgpack"),
    ("huge_bin", assemble(None, header_bytes=b"\xc6\xff\xff\xff\xf0"), "header (5 bytes) is not valid msgpack"),
    ("not_dict", assemble([1, 2]), "header = [1, 2]: expected a msgpack map, got list"),
    ("missing", assemble({k: v for k, v in good_header().items() if k != "pv"}, [good_payload()]),
     "header is missing field 'pv'"),
    ("unknown", _hdr(extra=1), "header has unknown field 'extra'"),
    ("version", _hdr(v=2), "header.v = 2: expected format version 1"),
    ("version_bool", _hdr(v=True), "header.v = True: expected format version 1"),
    ("kind", _hdr(kind="forward"), "header.kind = 'forward': expected one of ['dispatch', 'backward', 'result', 'grad']"),
    ("layer_bool", _hdr(layer=True), "header.layer = True: expected a non-negative int, got bool"),
    ("step_float", _hdr(step=1.0), "header.step = 1.0: expected a non-negative int, got float"),
    ("mb_negative", _hdr(mb=-1), "header.mb = -1: expected an int in [0, 2**63)"),
    ("experts_type", _hdr(experts="abc"), "header.experts = 'abc': expected a list of ints, got str"),
    ("count_negative", _hdr(counts=[5, -3, 10]), "counts[1] = -3: expected an int in"),
    ("count_bool", _hdr(counts=[5, True, 6]), "counts[1] = True: expected a non-negative int, got bool"),
    ("lengths", _hdr(experts=[3, 4]), "len(experts) = 2 but len(counts) = 3: expected equal"),
    ("dup_expert", _hdr(experts=[3, 4, 3]), "experts[2] = 3: duplicate of experts[0]"),
    ("dtype", _hdr(tensors=[spec(dtype="float64")]),
     "tensors[0].dtype = 'float64': expected one of ['float32', 'float16', 'bfloat16', 'int64', 'int32']"),
    ("nbytes", _hdr(tensors=[spec(shape=[3, 4], nbytes=40)]),
     "tensors[0].shape = [3, 4]: 12 elements x 4 bytes = 48 bytes but nbytes = 40"),
    ("neg_dim", _hdr(tensors=[spec(shape=[12, -4], nbytes=192)]), "tensors[0].shape[1] = -4: expected an int in"),
    ("rank", _hdr(tensors=[spec(shape=[1] * 9, nbytes=4)]), "tensors[0].shape has rank 9: expected at most 8"),
    ("spec_missing", _hdr(tensors=[{"name": "x", "dtype": "float32", "shape": [12, 4]}]),
     "tensors[0] is missing field 'nbytes'"),
    ("name", _hdr(tensors=[spec(name="")]), "tensors[0].name = '': expected a str of 1..64 chars"),
    ("dup_name", assemble(good_header(tensors=[spec(), spec(shape=[1], nbytes=4)]), [good_payload(), b"\0" * 4]),
     "tensors[1].name = 'x': duplicate of tensors[0]"),
    ("counts_sum", _hdr(counts=[5, 4, 1]), "counts sum to 10: expected 12 rows (tensors[0].shape[0])"),
    ("rank0_rows", _hdr(tensors=[spec(shape=[], nbytes=4)]), "tensors[0].shape = []: expected rank >= 1"),
    ("no_tensor_rows", assemble(good_header(tensors=[])), "counts sum to 12: expected 0 rows (the frame has no tensors)"),
    ("meta", _hdr(meta={"a": {"b": 1}}), "meta['a'] = {'b': 1}: expected None, bool, int, float or str"),
    ("meta_key", assemble(good_header(), [good_payload()], header_bytes=msgpack.packb({**good_header(), "meta": {b"k": 1}})),
     "header.meta key b'k': expected a str"),
    ("truncated", _hdr()[:-1], r"re:^frame is \d+ bytes but its header declares \d+ bytes .*: truncated$"),
    ("trailing", _hdr() + b"\0", r"re:^frame is \d+ bytes but its header declares \d+ bytes .*: 1 trailing bytes$"),
    ("huge_shape", _hdr(tensors=[spec(shape=[12, 2**30, 2**20], nbytes=12 * 2**52)]),
     r"re:header declares \d{17,} bytes .*: truncated$"),
    ("padding", None, r"re:^padding before tensors\[0\] \(bytes \d+\.\.\d+\) is not zero$"),
    ("type", "not bytes", "frame has type str: expected bytes, bytearray or memoryview"),
]  # fmt: skip


def _bad_padding():
    good = _hdr()
    hl = int.from_bytes(good[4:8], "little")
    pos = 8 + hl  # first padding byte
    assert (8 + hl) % ALIGNMENT, "test needs a header that leaves padding"
    return good[:pos] + b"\x01" + good[pos + 1 :]


@pytest.mark.parametrize("case,frame,message", BAD_FRAMES, ids=[c[0] for c in BAD_FRAMES])
def test_bad_frames_raise_frame_error_with_message(case, frame, message):
    if case == "padding":
        frame = _bad_padding()
    with pytest.raises(FrameError) as exc:
        decode_frame(frame)
    msg = str(exc.value)
    if message.startswith("re:"):
        assert re.search(message[3:], msg), msg
    else:
        assert message in msg, msg
    assert isinstance(exc.value, ValueError)


def test_good_helper_frame_is_accepted():
    # the BAD_FRAMES above are each one change away from this frame, so each error is the one named
    f = decode_frame(_hdr())
    assert f.header.counts == (5, 4, 3) and torch.equal(f.tensors["x"].reshape(-1), torch.arange(48.0))


def test_receiver_side_checks():
    buf = sample_frame()
    with pytest.raises(FrameError, match=r"^header.kind = 'dispatch': expected 'result'$"):
        decode_frame(buf, expected_kind="result")
    with pytest.raises(
        FrameError, match=r"^experts\[2\] = \(layer 3, expert 9\): not hosted by this server$"
    ):
        decode_frame(buf, hosted={(3, 2), (3, 5), (2, 9)})
    assert decode_frame(buf, hosted={(3, 2), (3, 5), (3, 9), (0, 0)}).header.layer == 3
    with pytest.raises(FrameError, match=rf"^frame is {len(buf)} bytes: exceeds max_bytes {len(buf) - 1}$"):
        decode_frame(buf, max_bytes=len(buf) - 1)
    assert decode_frame(buf, max_bytes=len(buf)).header.mb == 1


@pytest.mark.parametrize("wire", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite(wire, bad):
    x = torch.randn(4, 3)
    x[2, 1] = bad
    buf = encode_frame("result", layer=0, step=0, mb=0, pv=0, experts=[0], counts=[4], tensors={"x": x},
                       wire_dtype=wire)  # fmt: skip
    with pytest.raises(FrameError, match=r"^tensors\['x'\] has NaN/Inf \(check_finite is on\)$"):
        decode_frame(buf, check_finite=True, out_dtype=None)
    v = decode_frame(buf).tensors["x"][2, 1].item()  # off by default
    assert v == bad or (math.isnan(v) and math.isnan(bad))
    x[2, 1] = 1.0
    ok = encode_frame("result", layer=0, step=0, mb=0, pv=0, experts=[0], counts=[4], tensors={"x": x},
                      wire_dtype=wire)  # fmt: skip
    decode_frame(ok, check_finite=True)


def test_check_finite_sees_overflow_from_out_dtype_conversion():
    x = torch.full((2, 2), 1e30)
    buf = encode_frame("result", layer=0, step=0, mb=0, pv=0, experts=[0], counts=[2], tensors={"x": x})
    decode_frame(buf, check_finite=True)
    with pytest.raises(FrameError, match="has NaN/Inf"):
        decode_frame(buf, check_finite=True, out_dtype=torch.float16)


ENC = {"kind": "dispatch", "layer": 0, "step": 0, "mb": 0, "pv": 0, "experts": [1], "counts": [2]}


@pytest.mark.parametrize(
    "over,message",
    [
        (
            {"tensors": {"x": torch.zeros(2, 2, dtype=torch.float64)}},
            "tensors[0].dtype = 'torch.float64': expected one of",
        ),
        ({"tensors": {"x": torch.zeros(3, 2)}}, "counts sum to 2: expected 3 rows (tensors[0].shape[0])"),
        ({"tensors": {"x": [1, 2]}}, "tensors['x'] is a list: expected a torch.Tensor"),
        (
            {"tensors": {"x": torch.zeros(2, 2)}, "counts": [True]},
            "counts[0] = True: expected an int, got bool",
        ),
        (
            {"tensors": {"x": torch.zeros(2, 2)}, "experts": [1.5]},
            "experts[0] = 1.5: expected an int, got float",
        ),
        (
            {"tensors": {"x": torch.zeros(2, 2)}, "layer": -1},
            "header.layer = -1: expected an int in [0, 2**63)",
        ),
        ({"tensors": {"x": torch.zeros(2, 2)}, "kind": "fwd"}, "header.kind = 'fwd': expected one of"),
        (
            {"tensors": {"x": torch.zeros(2, 2)}, "wire_dtype": torch.int8},
            "wire_dtype = torch.int8: expected one of",
        ),
        ({"tensors": {"x": torch.zeros(2, 2)}, "meta": {"m": object()}}, "meta['m'] = <object object"),
        ({"tensors": {"n" * (MAX_NAME_LEN + 1): torch.zeros(2, 2)}}, "tensors[0].name = 'nnnn"),
    ],
)
def test_encode_rejects_what_decode_would(over, message):
    with pytest.raises(FrameError) as exc:
        encode_frame(**{**ENC, **over})
    assert message in str(exc.value), str(exc.value)


def test_frame_nbytes_upper_bound_holds_and_is_tight():
    big = 2**63 - 1
    for rows, hidden, segs, dtype in [(0, 1, 0, torch.float32), (37, 64, 5, torch.bfloat16),
                                      (300, 16, 40, torch.float16), (1, 1, 1, torch.int64)]:  # fmt: skip
        counts = [rows // segs] * segs if segs else []
        if segs:
            counts[-1] += rows - sum(counts)
        experts = [big - i for i in range(segs)]
        buf = encode_frame("dispatch", layer=big, step=big, mb=big, pv=big, experts=experts, counts=counts,
                           tensors={"n" * MAX_NAME_LEN: torch.zeros(rows, hidden, dtype=dtype)})  # fmt: skip
        bound = frame_nbytes_upper_bound(rows, hidden, segs, dtype)
        assert len(buf) <= bound < len(buf) + ALIGNMENT + 16 + 9 * segs


# ---------------------------------------------------------------------------------------------------
# fuzz: decode raises FrameError and nothing else; whatever it accepts is a canonical frame


def _same_frame(a: Frame, b: Frame) -> bool:
    return a.header == b.header and all(
        torch.equal(bits(a.tensors[n]), bits(b.tensors[n])) for n in a.tensors
    )


def _reencode(f: Frame) -> bytes:
    h = f.header
    wire = {s.name: s.dtype for s in h.tensors}
    assert all(str(t.dtype).removeprefix("torch.") == wire[n] for n, t in f.tensors.items())
    return encode_frame(h.kind, layer=h.layer, step=h.step, mb=h.mb, pv=h.pv, experts=h.experts, counts=h.counts,
                        tensors=f.tensors, meta=h.meta)  # fmt: skip


def _decode_or_error(buf):
    """Returns the Frame or None (FrameError); any other exception fails the test."""
    try:
        return decode_frame(buf, out_dtype=None)
    except FrameError as e:
        assert str(e)
        return None


SAMPLE = sample_frame()
SAMPLE_DATA_START = 8 + int.from_bytes(SAMPLE[4:8], "little")


def _padding_positions():
    f = decode_frame(SAMPLE, out_dtype=None)
    base = np.frombuffer(SAMPLE, dtype=np.uint8).ctypes.data
    pad, cursor = set(), SAMPLE_DATA_START
    for t in f.tensors.values():
        off = t.data_ptr() - base
        pad.update(range(cursor, off))
        cursor = off + t.nbytes
    assert cursor == len(SAMPLE) and pad
    return pad


SAMPLE_PADDING = _padding_positions()


def test_every_truncation_and_extension_is_rejected():
    assert _decode_or_error(SAMPLE) is not None
    for n in range(len(SAMPLE)):
        assert _decode_or_error(SAMPLE[:n]) is None, n
    for tail in (b"\0", b"\0" * 64, b"MOEF"):
        assert _decode_or_error(SAMPLE + tail) is None


@settings(FUZZ, max_examples=1000)
@given(
    edits=st.lists(
        st.tuples(
            st.one_of(st.integers(0, SAMPLE_DATA_START - 1), st.integers(0, len(SAMPLE) - 1)),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_fuzz_byte_mutations(edits):
    buf = bytearray(SAMPLE)
    for pos, val in edits:
        buf[pos] = val
    buf = bytes(buf)
    f = _decode_or_error(buf)
    if all(pos >= SAMPLE_DATA_START for pos, _ in edits):
        # only padding and tensor bytes changed: rejected exactly when padding is not zero, else canonical
        assert (f is None) == any(buf[p] for p in SAMPLE_PADDING)
        if f is not None:
            assert _reencode(f) == buf
    elif f is not None:  # another valid header (e.g. a different expert id): it must describe itself
        assert _same_frame(decode_frame(_reencode(f), out_dtype=None), f)


@settings(FUZZ, max_examples=300)
@given(
    header=st.binary(max_size=200),
    tail=st.binary(max_size=300),
    declared=st.none() | st.integers(0, 2**32 - 1),
)
def test_fuzz_garbage_headers(header, tail, declared):
    n = len(header) if declared is None else declared
    buf = MAGIC + n.to_bytes(4, "little") + header + tail
    f = _decode_or_error(buf)
    if f is not None:
        assert _same_frame(decode_frame(_reencode(f), out_dtype=None), f)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats() | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)  # fmt: skip
header_fields = st.sampled_from(
    ["v", "kind", "layer", "step", "mb", "pv", "experts", "counts", "tensors", "meta"]
)
spec_fields = st.sampled_from(["name", "dtype", "shape", "nbytes"])


@settings(FUZZ, max_examples=400)
@given(
    top=st.dictionaries(header_fields, msgpack_values, max_size=3),
    inner=st.dictionaries(spec_fields, msgpack_values, max_size=2),
    drop=st.lists(header_fields, max_size=2),
    payload_delta=st.integers(-70, 70),
)
def test_fuzz_header_field_values(top, inner, drop, payload_delta):
    h = good_header()
    h["tensors"] = [{**h["tensors"][0], **inner}]
    h.update(top)
    for k in drop:
        h.pop(k, None)
    payload = good_payload()
    payload = payload[:payload_delta] if payload_delta < 0 else payload + b"\0" * payload_delta
    try:
        buf = assemble(h, [payload])
    except (OverflowError, ValueError):  # msgpack cannot write it, so nobody can send it
        return
    f = _decode_or_error(buf)
    if f is not None:
        h = f.header
        for v in (h.v, h.layer, h.step, h.mb, h.pv, *h.experts, *h.counts):
            assert type(v) is int and v >= 0
        assert sum(h.counts) == (h.tensors[0].shape[0] if h.tensors else 0)
        for s in h.tensors:
            t = f.tensors[s.name]
            assert tuple(t.shape) == s.shape and t.nbytes == s.nbytes
        assert _same_frame(decode_frame(_reencode(f), out_dtype=None), f)


dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32])


@settings(FUZZ, max_examples=150)
@given(
    counts=st.lists(st.integers(0, 5), max_size=6),
    hidden=st.integers(0, 9),
    dtype=dtypes,
    extra=st.lists(st.tuples(dtypes, st.lists(st.integers(0, 3), max_size=3)), max_size=3),
    ints=st.tuples(*[st.integers(0, 2**63 - 1)] * 4),
    kind=st.sampled_from(["dispatch", "backward", "result", "grad"]),
)
def test_fuzz_valid_frames_round_trip(counts, hidden, dtype, extra, ints, kind):
    rows = sum(counts)
    tensors = {
        "x": _values(dtype, (rows, hidden)) if rows * hidden >= 4 else torch.zeros(rows, hidden, dtype=dtype)
    }
    for i, (dt, shape) in enumerate(extra):
        tensors[f"t{i}"] = torch.ones(shape, dtype=dt)
    layer, step, mb, pv = ints
    experts = list(range(100, 100 + len(counts)))
    buf = encode_frame(
        kind, layer=layer, step=step, mb=mb, pv=pv, experts=experts, counts=counts, tensors=tensors
    )
    f = decode_frame(buf, out_dtype=None, expected_kind=kind, hosted={(layer, e) for e in experts})
    assert (f.header.layer, f.header.step, f.header.mb, f.header.pv) == ints
    assert f.header.counts == tuple(counts)
    for name, t in tensors.items():
        assert f.tensors[name].shape == t.shape and torch.equal(bits(f.tensors[name]), bits(t))
    assert len(buf) <= frame_nbytes_upper_bound(rows, hidden, len(counts), dtype) + sum(
        ALIGNMENT + 64 + t.nbytes for n, t in tensors.items() if n != "x")  # fmt: skip


def test_unvalidated_encode_gives_the_same_bytes_and_the_decoder_still_rejects_bad_headers():
    x = torch.randn(6, 8)
    kw = dict(layer=1, step=2, mb=0, pv=3, experts=[4, 5], counts=[2, 4], tensors={"x": x}, meta={"src": 1})
    assert encode_frame("dispatch", **kw) == encode_frame("dispatch", validate=False, **kw)
    bad = encode_frame("dispatch", validate=False, **{**kw, "counts": [2, 3]})  # rows do not add up
    with pytest.raises(FrameError, match="counts sum to 5"):
        decode_frame(bad)
