"""Tensor frames for the data plane: a small msgpack header followed by raw tensor buffers.

Wire layout (all offsets relative to the start of the frame)::

    0   4 bytes   magic b"MOEF"
    4   4 bytes   header length H, uint32 little-endian
    8   H bytes   msgpack map (the header, see ``FrameHeader``)
    ..  per tensor, in header order: zero padding up to the next multiple of 64, then the raw
        C-contiguous little-endian bytes of the tensor (exactly ``nbytes`` of them)

The frame ends right after the last tensor's bytes (no trailing padding). Tensor bytes are kept
outside msgpack on purpose: ``msgpack.unpackb`` copies every ``bin`` into a new ``bytes`` object,
whereas a memoryview slice of the received message can be wrapped by ``torch.frombuffer`` without a
copy. The 64-byte alignment keeps every tensor aligned for its dtype (CPython ``bytes`` payloads are
16-byte aligned, so decoded views are at least 16-byte aligned in memory).

Encoding returns one ``bytes`` object, because that is what a gRPC ``bytes`` field needs in the end;
``b"".join`` over [prefix + header, padding, memoryviews of the tensors] copies every tensor byte exactly
once (the cost of one memcpy of the payload; a preallocated ``bytearray`` filled through a memoryview needs
a second copy for ``bytes(...)`` and was several times slower: docs/measurements.md).

Decoding validates everything before it touches tensor bytes and raises ``FrameError`` (a ``ValueError``)
for every problem, with a message naming the field, the value and what was expected. No byte string makes
``decode_frame`` raise anything else, and nothing is allocated from a declared size before that size has
been checked against the actual buffer length.

Decoded tensors are zero-copy views of the input buffer when no dtype conversion is needed. When the
input is ``bytes`` (immutable) those views are read-only memory: do not modify them in place (``clone()``
them first); writing into them would mutate an immutable ``bytes`` object. Tensors that went through an
``out_dtype`` conversion are fresh, writable tensors. Views keep the input buffer alive.
"""

from __future__ import annotations

import math
import operator
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
import numpy as np
import torch

__all__ = [
    "ALIGNMENT",
    "FORMAT_VERSION",
    "KINDS",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "MAX_NAME_LEN",
    "MAX_RANK",
    "SUPPORTED_DTYPES",
    "ExpectedFrame",
    "Frame",
    "FrameError",
    "FrameHeader",
    "TensorSpec",
    "decode_expected",
    "decode_frame",
    "encode_answer",
    "encode_answer_parts",
    "encode_frame",
    "encode_frame_parts",
    "expected_frame",
    "frame_header_nbytes",
    "frame_nbytes",
    "frame_nbytes_upper_bound",
]

MAGIC = b"MOEF"
FORMAT_VERSION = 1
ALIGNMENT = 64
PREFIX_BYTES = 8  # magic + uint32 header length
MAX_HEADER_BYTES = 1 << 20  # a header with 32 segments is ~0.3 KB; 1 MiB leaves room for ~50k segments
MAX_RANK = 8
MAX_NAME_LEN = 64
MAX_META_ITEMS = 64
_INT_LIMIT = 1 << 63  # header ints must fit int64 (and msgpack)

KINDS: tuple[str, ...] = ("dispatch", "backward", "result", "grad")

SUPPORTED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SUPPORTED_DTYPES.items()}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_REQUIRED_FIELDS = ("v", "kind", "layer", "step", "mb", "pv", "experts", "counts", "tensors")
_ALL_FIELDS = frozenset(_REQUIRED_FIELDS) | {"meta"}
_SPEC_FIELDS = ("name", "dtype", "shape", "nbytes")


class FrameError(ValueError):
    """A frame (or the arguments to build one) is malformed. The message names field, value, expectation."""


@dataclass(frozen=True)
class TensorSpec:
    """One raw buffer of the frame: ``nbytes == prod(shape) * itemsize(dtype)``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class FrameHeader:
    """Decoded header. Field names are the wire keys.

    v: format version; kind: one of ``KINDS``; layer: MoE layer index; step: training/inference step;
    mb: micro-batch index; pv: placement version the sender routed with; experts: expert ids of the
    row segments, in order; counts: rows per segment (they sum to ``tensors[0].shape[0]``);
    tensors: the raw buffers, in wire order; meta: small extra values (scalars or lists of scalars).
    """

    v: int
    kind: str
    layer: int
    step: int
    mb: int
    pv: int
    experts: tuple[int, ...]
    counts: tuple[int, ...]
    tensors: tuple[TensorSpec, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Total rows over all segments."""
        return sum(self.counts)


@dataclass
class Frame:
    header: FrameHeader
    tensors: dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# header validation (shared by encode and decode, so encode never produces a frame decode rejects)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_uint(path: str, x: object) -> int:
    if not _is_int(x):
        raise FrameError(f"{path} = {x!r}: expected a non-negative int, got {type(x).__name__}")
    if not 0 <= x < _INT_LIMIT:
        raise FrameError(f"{path} = {x!r}: expected an int in [0, 2**63)")
    return x


def _check_uint_list(path: str, xs: object) -> tuple[int, ...]:
    if not isinstance(xs, list):
        raise FrameError(f"header.{path} = {_short(xs)}: expected a list of ints, got {type(xs).__name__}")
    # fast path for the common, valid case (msgpack yields exact ints; bool is a subclass, so excluded)
    if all(type(x) is int for x in xs) and (not xs or (min(xs) >= 0 and max(xs) < _INT_LIMIT)):
        return tuple(xs)
    return tuple(_check_uint(f"{path}[{i}]", x) for i, x in enumerate(xs))


def _short(x: object, limit: int = 80) -> str:
    r = repr(x)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _check_meta_value(path: str, x: object, nested: bool = False) -> None:
    if x is None or isinstance(x, (bool, str)):
        return
    if isinstance(x, int):
        if not -_INT_LIMIT <= x < _INT_LIMIT:
            raise FrameError(f"{path} = {x!r}: expected an int in [-2**63, 2**63)")
        return
    if isinstance(x, float):
        return
    if isinstance(x, list) and not nested:
        for i, y in enumerate(x):
            _check_meta_value(f"{path}[{i}]", y, nested=True)
        return
    what = "None, bool, int, float or str" + ("" if nested else ", or a list of those")
    raise FrameError(f"{path} = {_short(x)}: expected {what}, got {type(x).__name__}")


def _parse_meta(meta: object) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise FrameError(f"header.meta = {_short(meta)}: expected a dict, got {type(meta).__name__}")
    if len(meta) > MAX_META_ITEMS:
        raise FrameError(f"header.meta has {len(meta)} items: expected at most {MAX_META_ITEMS}")
    for k, val in meta.items():
        if not isinstance(k, str):
            raise FrameError(f"header.meta key {_short(k)}: expected a str, got {type(k).__name__}")
        _check_meta_value(f"meta[{k!r}]", val)
    return dict(meta)


def _parse_spec(i: int, spec: object) -> TensorSpec:
    if not isinstance(spec, dict):
        raise FrameError(f"tensors[{i}] = {_short(spec)}: expected a dict, got {type(spec).__name__}")
    for k in _SPEC_FIELDS:
        if k not in spec:
            raise FrameError(f"tensors[{i}] is missing field {k!r}")
    extra = set(spec) - set(_SPEC_FIELDS)
    if extra:
        raise FrameError(f"tensors[{i}] has unknown field(s) {sorted(map(repr, extra))}")
    name, dtype, shape, nbytes = spec["name"], spec["dtype"], spec["shape"], spec["nbytes"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
        raise FrameError(f"tensors[{i}].name = {_short(name)}: expected a str of 1..{MAX_NAME_LEN} chars")
    if not isinstance(dtype, str) or dtype not in SUPPORTED_DTYPES:
        raise FrameError(f"tensors[{i}].dtype = {_short(dtype)}: expected one of {list(SUPPORTED_DTYPES)}")
    if not isinstance(shape, list):
        raise FrameError(f"tensors[{i}].shape = {_short(shape)}: expected a list of ints")
    if len(shape) > MAX_RANK:
        raise FrameError(f"tensors[{i}].shape has rank {len(shape)}: expected at most {MAX_RANK}")
    dims = tuple(_check_uint(f"tensors[{i}].shape[{j}]", d) for j, d in enumerate(shape))
    nbytes = _check_uint(f"tensors[{i}].nbytes", nbytes)
    itemsize = SUPPORTED_DTYPES[dtype].itemsize
    numel = math.prod(dims)
    if numel * itemsize != nbytes:
        raise FrameError(
            f"tensors[{i}].shape = {list(dims)}: {numel} elements x {itemsize} bytes = "
            f"{numel * itemsize} bytes but nbytes = {nbytes}"
        )
    return TensorSpec(name=name, dtype=dtype, shape=dims, nbytes=nbytes)


_KIND_SET = frozenset(KINDS)
_META_SCALARS = (type(None), bool, str, float)


def _uint_tuple_fast(xs: object) -> tuple[int, ...] | None:
    """A list of exact ints in [0, 2**63) as a tuple; None for anything else (the full check names it)."""
    if type(xs) is not list:
        return None
    for x in xs:
        if type(x) is not int or not 0 <= x < _INT_LIMIT:
            return None
    return tuple(xs)


def _parse_header_fast(obj: object) -> FrameHeader | None:
    """The header of a well-formed frame, checked with as few Python operations as possible; None as soon as
    anything is unusual (wrong type, missing or extra key, out of range, meta lists), and `_parse_header` then
    runs the full checks, which name the problem. Accepts nothing the full checks reject and returns the same
    FrameHeader: a tiny frame's decode is dominated by this parse, paid on every data-plane call."""
    if type(obj) is not dict:
        return None
    n = len(obj)
    if n != 9 and not (n == 10 and "meta" in obj):
        return None
    try:  # the 9 required keys present and n <= 10 with "meta": no unknown key
        v, kind, raw_specs = obj["v"], obj["kind"], obj["tensors"]
        layer, step, mb, pv = obj["layer"], obj["step"], obj["mb"], obj["pv"]
        experts, counts = _uint_tuple_fast(obj["experts"]), _uint_tuple_fast(obj["counts"])
    except KeyError:
        return None
    if type(v) is not int or v != FORMAT_VERSION or type(kind) is not str or kind not in _KIND_SET:
        return None
    for x in (layer, step, mb, pv):
        if type(x) is not int or not 0 <= x < _INT_LIMIT:
            return None
    if experts is None or counts is None or len(experts) != len(counts) or len(set(experts)) != len(experts):
        return None
    if type(raw_specs) is not list:
        return None
    specs = []
    for spec in raw_specs:
        if type(spec) is not dict or len(spec) != 4:
            return None
        try:
            name, dtype, shape, nbytes = spec["name"], spec["dtype"], spec["shape"], spec["nbytes"]
        except KeyError:
            return None
        if type(name) is not str or not 0 < len(name) <= MAX_NAME_LEN or type(dtype) is not str:
            return None
        torch_dtype = SUPPORTED_DTYPES.get(dtype)
        dims = _uint_tuple_fast(shape)
        if torch_dtype is None or dims is None or len(dims) > MAX_RANK:
            return None
        if type(nbytes) is not int or not 0 <= nbytes < _INT_LIMIT or math.prod(dims) * torch_dtype.itemsize != nbytes:
            return None
        specs.append(TensorSpec(name, dtype, dims, nbytes))
    if len({s.name for s in specs}) != len(specs):
        return None
    rows = sum(counts)
    if specs:
        if not specs[0].shape or rows != specs[0].shape[0]:
            return None
    elif rows:
        return None
    meta: dict[str, Any] = {}
    if n == 10:
        raw_meta = obj["meta"]
        if type(raw_meta) is not dict or len(raw_meta) > MAX_META_ITEMS:
            return None
        for k, val in raw_meta.items():
            if type(k) is not str:
                return None
            if type(val) is int:
                if not -_INT_LIMIT <= val < _INT_LIMIT:
                    return None
            elif type(val) not in _META_SCALARS:  # lists (and anything else): the full check
                return None
        meta = dict(raw_meta)
    return FrameHeader(v, kind, layer, step, mb, pv, experts, counts, tuple(specs), meta)


def _parse_header(obj: object) -> FrameHeader:
    fast = _parse_header_fast(obj)
    if fast is not None:
        return fast
    if not isinstance(obj, dict):
        raise FrameError(f"header = {_short(obj)}: expected a msgpack map, got {type(obj).__name__}")
    for k in obj:
        if not isinstance(k, str) or k not in _ALL_FIELDS:
            raise FrameError(f"header has unknown field {_short(k)}: expected fields {sorted(_ALL_FIELDS)}")
    for k in _REQUIRED_FIELDS:
        if k not in obj:
            raise FrameError(f"header is missing field {k!r}")
    v = obj["v"]
    if not _is_int(v) or v != FORMAT_VERSION:
        raise FrameError(f"header.v = {_short(v)}: expected format version {FORMAT_VERSION}")
    kind = obj["kind"]
    if not isinstance(kind, str) or kind not in KINDS:
        raise FrameError(f"header.kind = {_short(kind)}: expected one of {list(KINDS)}")
    layer = _check_uint("header.layer", obj["layer"])
    step = _check_uint("header.step", obj["step"])
    mb = _check_uint("header.mb", obj["mb"])
    pv = _check_uint("header.pv", obj["pv"])
    experts = _check_uint_list("experts", obj["experts"])
    counts = _check_uint_list("counts", obj["counts"])
    if len(experts) != len(counts):
        raise FrameError(f"len(experts) = {len(experts)} but len(counts) = {len(counts)}: expected equal")
    if len(set(experts)) != len(experts):
        seen: dict[int, int] = {}
        for i, e in enumerate(experts):
            if e in seen:
                raise FrameError(f"experts[{i}] = {e}: duplicate of experts[{seen[e]}]")
            seen[e] = i
    raw_specs = obj["tensors"]
    if not isinstance(raw_specs, list):
        raise FrameError(f"header.tensors = {_short(raw_specs)}: expected a list of tensor specs")
    specs = tuple(_parse_spec(i, s) for i, s in enumerate(raw_specs))
    names: dict[str, int] = {}
    for i, s in enumerate(specs):
        if s.name in names:
            raise FrameError(f"tensors[{i}].name = {s.name!r}: duplicate of tensors[{names[s.name]}]")
        names[s.name] = i
    rows = sum(counts)
    if specs:
        if not specs[0].shape:
            raise FrameError("tensors[0].shape = []: expected rank >= 1 (its rows are the segments' rows)")
        if rows != specs[0].shape[0]:
            raise FrameError(f"counts sum to {rows}: expected {specs[0].shape[0]} rows (tensors[0].shape[0])")
    elif rows:
        raise FrameError(f"counts sum to {rows}: expected 0 rows (the frame has no tensors)")
    meta = _parse_meta(obj["meta"]) if "meta" in obj else {}
    return FrameHeader(
        v=v, kind=kind, layer=layer, step=step, mb=mb, pv=pv,
        experts=experts, counts=counts, tensors=specs, meta=meta,
    )  # fmt: skip


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _layout(header_len: int, specs: Sequence[TensorSpec]) -> tuple[list[int], int]:
    """Byte offsets of the tensors and the total frame length."""
    cursor = PREFIX_BYTES + header_len
    offsets = []
    for s in specs:
        off = _align(cursor)
        offsets.append(off)
        cursor = off + s.nbytes
    return offsets, cursor


# --------------------------------------------------------------------------------------------------
# encode


_ONLY_INT = frozenset((int,))


def _as_uint_list(path: str, xs: object) -> list[int]:
    if type(xs) in (list, tuple) and _ONLY_INT.issuperset(map(type, xs)):
        return list(xs)  # fast path (C-level type check, no generator); range checks happen in _parse_header
    if isinstance(xs, (torch.Tensor, np.ndarray)):
        xs = xs.tolist()
    if isinstance(xs, (list, tuple)) and all(type(x) is int for x in xs):
        return list(xs)
    if isinstance(xs, (str, bytes)) or not isinstance(xs, Sequence):
        raise FrameError(f"{path} = {_short(xs)}: expected a sequence of ints")
    out = []
    for i, x in enumerate(xs):
        if isinstance(x, bool):
            raise FrameError(f"{path}[{i}] = {x!r}: expected an int, got bool")
        try:
            out.append(operator.index(x))  # accepts numpy / torch integer scalars
        except TypeError:
            raise FrameError(f"{path}[{i}] = {_short(x)}: expected an int, got {type(x).__name__}") from None
    return out


_tls = threading.local()
_ZERO_PAD = bytes(ALIGNMENT)


def _header_obj(kind: str, layer: int, step: int, mb: int, pv: int, experts: list[int], counts: list[int],
                specs: list[dict[str, Any]], meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """The header map as it is packed (key order included: expected_frame relies on the same bytes)."""
    obj: dict[str, Any] = {"v": FORMAT_VERSION, "kind": kind, "layer": layer, "step": step, "mb": mb, "pv": pv,
                           "experts": experts, "counts": counts, "tensors": specs}  # fmt: skip
    if meta:
        obj["meta"] = dict(meta)
    return obj


def _packer() -> msgpack.Packer:
    """This thread's msgpack Packer (packb builds a new one per call; a Packer is not thread-safe)."""
    try:
        return _tls.packer
    except AttributeError:
        p = _tls.packer = msgpack.Packer(use_bin_type=True)
        return p


def encode_frame(
    kind: str,
    *,
    layer: int,
    step: int,
    mb: int,
    pv: int,
    experts: Sequence[int],
    counts: Sequence[int],
    tensors: Mapping[str, torch.Tensor],
    wire_dtype: torch.dtype | None = None,
    meta: Mapping[str, Any] | None = None,
    validate: bool = True,
    lead: Callable[[int], bytes] | None = None,
) -> bytes:
    """Build one frame as a single ``bytes`` object (what a gRPC ``bytes`` field takes): the join of
    ``encode_frame_parts`` (same arguments).

    ``lead``: called with the frame's length, returns bytes written in front of it in the same join (the
    transport's envelope, dispatch/envelope.py `envelope_prefix`): the frame is then copied once in all, not
    once more by a separate wrap.

    ``validate=False`` skips re-checking the header fields (a third of a tiny encode): for the
    runtime's own hot path, whose headers come from a DispatchPlan or an already-decoded request. The receiver
    validates every frame regardless, so a bad header is still rejected there.

    ``tensors`` are written in mapping order; the first one carries the segment rows
    (``shape[0] == sum(counts)``). Floating tensors are cast to ``wire_dtype`` (float32, float16 or
    bfloat16) when it is given; integer (index) tensors are sent as they are. Tensors are detached, moved
    to CPU and made contiguous. Raises ``FrameError`` for anything ``decode_frame`` would reject.
    """
    return b"".join(encode_frame_parts(kind, layer=layer, step=step, mb=mb, pv=pv, experts=experts, counts=counts,
                                       tensors=tensors, wire_dtype=wire_dtype, meta=meta, validate=validate,
                                       lead=lead))  # fmt: skip


def encode_frame_parts(
    kind: str,
    *,
    layer: int,
    step: int,
    mb: int,
    pv: int,
    experts: Sequence[int],
    counts: Sequence[int],
    tensors: Mapping[str, torch.Tensor],
    wire_dtype: torch.dtype | None = None,
    meta: Mapping[str, Any] | None = None,
    validate: bool = True,
    lead: Callable[[int], bytes] | None = None,
) -> list[Any]:
    """``encode_frame``'s bytes as the buffers that make them up, in order (small bytes, then each tensor's own
    memory as a numpy array): what a socket's ``sendmsg`` sends without joining them (the TCP lane,
    dispatch/lane.py). The tensor buffers are views: send them before the tensors change."""
    if wire_dtype is not None and wire_dtype not in _FLOAT_DTYPES:
        raise FrameError(f"wire_dtype = {wire_dtype}: expected one of {[str(d) for d in _FLOAT_DTYPES]}")
    if not isinstance(tensors, Mapping):
        raise FrameError(f"tensors = {_short(tensors)}: expected a mapping name -> torch.Tensor")
    prepared: list[torch.Tensor] = []
    specs: list[dict[str, Any]] = []
    for i, (name, t) in enumerate(tensors.items()):
        if not isinstance(t, torch.Tensor):
            raise FrameError(f"tensors[{name!r}] is a {type(t).__name__}: expected a torch.Tensor")
        if t.requires_grad:
            t = t.detach()
        if not t.is_cpu:
            t = t.cpu()
        if wire_dtype is not None and t.dtype != wire_dtype and t.dtype in _FLOAT_DTYPES:
            t = t.to(wire_dtype)
        dtype_name = _DTYPE_NAMES.get(t.dtype)
        if dtype_name is None:
            raise FrameError(
                f"tensors[{i}].dtype = {str(t.dtype)!r}: expected one of {list(SUPPORTED_DTYPES)}"
            )
        t = t.contiguous()
        prepared.append(t)
        specs.append({"name": name, "dtype": dtype_name, "shape": list(t.shape), "nbytes": t.nbytes})
    obj = _header_obj(kind, layer, step, mb, pv, _as_uint_list("experts", experts), _as_uint_list("counts", counts),
                      specs, meta)
    if validate:
        _parse_header(obj)  # the same checks the receiver runs
    packed = _packer().pack(obj)
    header_len = len(packed)
    if header_len > MAX_HEADER_BYTES:
        raise FrameError(f"header is {header_len} bytes: exceeds MAX_HEADER_BYTES {MAX_HEADER_BYTES}")
    parts: list[Any] = [MAGIC, header_len.to_bytes(4, "little"), packed]
    cursor = PREFIX_BYTES + header_len
    for t, spec in zip(prepared, specs):  # the layout of _layout, inline: this is every data-plane call's path
        off = _align(cursor)
        if off > cursor:
            parts.append(_ZERO_PAD[: off - cursor])
        nbytes = spec["nbytes"]
        if nbytes:  # the tensor's own buffer (numpy has no bfloat16: its bits as int16)
            parts.append((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy())
        cursor = off + nbytes
    if lead is not None:
        parts.insert(0, lead(cursor))
    return parts


def encode_answer(kind: str, request: FrameHeader, name: str, tensor: torch.Tensor, wire_dtype: torch.dtype,
                  lead: Callable[[int], bytes] | None = None) -> bytes:  # fmt: skip
    """The frame answering `request` (a header that passed decode_frame): its layer, step, mb, pv, experts and
    counts, no meta, one float tensor `name` cast to `wire_dtype`. The same bytes as encode_frame with those
    arguments (validate=False), with less Python per call: an expert server's every reply."""
    return b"".join(encode_answer_parts(kind, request, name, tensor, wire_dtype, lead))


def encode_answer_parts(kind: str, request: FrameHeader, name: str, tensor: torch.Tensor, wire_dtype: torch.dtype,
                        lead: Callable[[int], bytes] | None = None) -> list[Any]:  # fmt: skip
    """``encode_answer``'s bytes as the buffers that make them up (as ``encode_frame_parts``)."""
    t = tensor.detach() if tensor.requires_grad else tensor
    if not t.is_cpu:
        t = t.cpu()
    if t.dtype != wire_dtype:
        t = t.to(wire_dtype)
    t = t.contiguous()
    nbytes = t.nbytes
    spec = {"name": name, "dtype": _DTYPE_NAMES[wire_dtype], "shape": list(t.shape), "nbytes": nbytes}
    packed = _packer().pack({"v": FORMAT_VERSION, "kind": kind, "layer": request.layer, "step": request.step,
                             "mb": request.mb, "pv": request.pv, "experts": list(request.experts),
                             "counts": list(request.counts), "tensors": [spec]})  # fmt: skip  # _header_obj's order
    header_len = len(packed)
    off = _align(PREFIX_BYTES + header_len)
    parts = [MAGIC, header_len.to_bytes(4, "little"), packed, _ZERO_PAD[: off - PREFIX_BYTES - header_len]]
    if nbytes:
        parts.append((t.view(torch.int16) if wire_dtype == torch.bfloat16 else t).numpy())
    if lead is not None:
        parts.insert(0, lead(off + nbytes))
    return parts


# --------------------------------------------------------------------------------------------------
# decode

_readonly_warning_lock = threading.Lock()
_readonly_warning_consumed = False


def _frombuffer(mv: memoryview, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
    """Zero-copy view; silences torch's "buffer is not writable" warning for read-only buffers.

    torch emits that warning once per process (TORCH_WARN_ONCE), so the catch_warnings block only
    runs until the first read-only view has been made; a lock keeps our own threads from interleaving
    catch_warnings (which is not thread safe). The test suite checks that later calls stay silent.
    """
    global _readonly_warning_consumed
    if mv.readonly and not _readonly_warning_consumed:
        with _readonly_warning_lock, warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="The given buffer is not writable", category=UserWarning
            )
            t = torch.frombuffer(mv, dtype=dtype, count=count, offset=offset)
            _readonly_warning_consumed = True
        return t
    return torch.frombuffer(mv, dtype=dtype, count=count, offset=offset)


def _as_byte_view(buf: object) -> memoryview:
    if isinstance(buf, (bytes, bytearray)):
        return memoryview(buf)
    if isinstance(buf, memoryview):
        if not buf.c_contiguous:
            raise FrameError("frame memoryview is not C-contiguous: expected a contiguous byte buffer")
        if buf.format != "B" or buf.ndim != 1:
            try:
                return buf.cast("B")
            except (TypeError, ValueError) as e:
                raise FrameError(f"frame memoryview (format {buf.format!r}) cannot be viewed as bytes: {e}")
        return buf
    raise FrameError(f"frame has type {type(buf).__name__}: expected bytes, bytearray or memoryview")


def decode_frame(
    buf: bytes | bytearray | memoryview,
    *,
    expected_kind: str | None = None,
    hosted: set[tuple[int, int]] | frozenset[tuple[int, int]] | None = None,
    max_bytes: int | None = None,
    check_finite: bool = False,
    out_dtype: torch.dtype | None = torch.float32,
) -> Frame:
    """Validate and decode one frame. Raises ``FrameError`` and nothing else for a bad frame.

    expected_kind: reject frames of another kind. hosted: the (layer, expert) pairs this server holds;
    every segment's expert must be among them. max_bytes: reject larger frames before parsing.
    check_finite: reject floating tensors holding NaN/Inf (costs one pass over the data).
    out_dtype: floating tensors are converted to it (a copy, only when the wire dtype differs);
    ``None`` keeps the wire dtype. Integer tensors are never converted.

    Unconverted tensors are views of ``buf``: read-only memory for ``bytes`` input (do not write them in
    place; clone first), and aliases of the caller's memory for ``bytearray``/``memoryview`` input.
    """
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"out_dtype = {out_dtype}: expected None or one of {[str(d) for d in _FLOAT_DTYPES]}"
        )
    mv = _as_byte_view(buf)
    n = mv.nbytes
    if max_bytes is not None and n > max_bytes:
        raise FrameError(f"frame is {n} bytes: exceeds max_bytes {max_bytes}")
    if n < PREFIX_BYTES:
        raise FrameError(
            f"frame is {n} bytes: too short for the {PREFIX_BYTES}-byte prefix (magic, header length)"
        )
    magic = bytes(mv[:4])
    if magic != MAGIC:
        raise FrameError(f"frame magic = {magic!r}: expected {MAGIC!r}")
    header_len = int.from_bytes(mv[4:PREFIX_BYTES], "little")
    if header_len > MAX_HEADER_BYTES:
        raise FrameError(f"header length = {header_len}: exceeds MAX_HEADER_BYTES {MAX_HEADER_BYTES}")
    if header_len > n - PREFIX_BYTES:
        raise FrameError(
            f"header length = {header_len}: only {n - PREFIX_BYTES} bytes follow the prefix (truncated frame)"
        )
    try:
        # unpackb bounds every container/str/bin length by the header length, so no outsized allocation.
        obj = msgpack.unpackb(
            mv[PREFIX_BYTES : PREFIX_BYTES + header_len], raw=False, strict_map_key=True, use_list=True
        )
    except Exception as e:  # noqa: BLE001 - msgpack raises ExtraData, FormatError, StackError, ValueError, ...
        raise FrameError(
            f"header ({header_len} bytes) is not valid msgpack: {type(e).__name__}: {e}"
        ) from None
    header = _parse_header(obj)
    if expected_kind is not None and header.kind != expected_kind:
        raise FrameError(f"header.kind = {header.kind!r}: expected {expected_kind!r}")
    if hosted is not None:
        for i, e in enumerate(header.experts):
            if (header.layer, e) not in hosted:
                raise FrameError(
                    f"experts[{i}] = (layer {header.layer}, expert {e}): not hosted by this server"
                )
    offsets, total = _layout(header_len, header.tensors)
    if total != n:
        what = "truncated" if n < total else f"{n - total} trailing bytes"
        raise FrameError(
            f"frame is {n} bytes but its header declares {total} bytes (prefix + header + "
            f"{len(header.tensors)} tensors, {ALIGNMENT}-byte aligned): {what}"
        )
    cursor = PREFIX_BYTES + header_len
    out: dict[str, torch.Tensor] = {}
    for i, (off, spec) in enumerate(zip(offsets, header.tensors)):
        if off > cursor and int.from_bytes(mv[cursor:off], "little"):
            raise FrameError(f"padding before tensors[{i}] (bytes {cursor}..{off}) is not zero")
        dtype = SUPPORTED_DTYPES[spec.dtype]
        numel = spec.nbytes // dtype.itemsize
        if numel:
            t = _frombuffer(mv, dtype, numel, off)
            t = t.view(*spec.shape) if spec.shape else t.view(())  # view(*dims): view(tuple) parses ~4x slower
        else:
            t = torch.empty(spec.shape, dtype=dtype)
        if out_dtype is not None and dtype in _FLOAT_DTYPES and dtype != out_dtype:
            t = t.to(out_dtype)
        if check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FrameError(f"tensors[{spec.name!r}] has NaN/Inf (check_finite is on)")
        out[spec.name] = t
        cursor = off + spec.nbytes
    return Frame(header=header, tensors=out)


def frame_nbytes(head: bytes | bytearray | memoryview) -> int:
    """The total length of the frame that starts with `head` (at least its prefix and whole header), from the
    header alone: what a receiver of a chunked frame allocates before the rest arrives. Validates the prefix and
    the header as decode_frame does; raises FrameError."""
    mv = _as_byte_view(head)
    if mv.nbytes < PREFIX_BYTES:
        raise FrameError(f"first chunk is {mv.nbytes} bytes: too short for the {PREFIX_BYTES}-byte prefix")
    if bytes(mv[:4]) != MAGIC:
        raise FrameError(f"frame magic = {bytes(mv[:4])!r}: expected {MAGIC!r}")
    header_len = int.from_bytes(mv[4:PREFIX_BYTES], "little")
    if header_len > MAX_HEADER_BYTES:
        raise FrameError(f"header length = {header_len}: exceeds MAX_HEADER_BYTES {MAX_HEADER_BYTES}")
    if header_len > mv.nbytes - PREFIX_BYTES:
        raise FrameError(f"header length = {header_len}: the first chunk holds only {mv.nbytes - PREFIX_BYTES} "
                         "bytes after the prefix (it must hold the whole header)")
    try:
        obj = msgpack.unpackb(mv[PREFIX_BYTES : PREFIX_BYTES + header_len], raw=False, strict_map_key=True,
                              use_list=True)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - as in decode_frame
        raise FrameError(f"header ({header_len} bytes) is not valid msgpack: {type(e).__name__}: {e}") from None
    return _layout(header_len, _parse_header(obj).tensors)[1]


def frame_header_nbytes(frame: bytes | bytearray | memoryview) -> int:
    """Bytes of the prefix + header of an encoded frame (where its first tensor's padding starts)."""
    mv = _as_byte_view(frame)
    return PREFIX_BYTES + int.from_bytes(mv[4:PREFIX_BYTES], "little")


def frame_nbytes_upper_bound(rows: int, hidden: int, num_segments: int, dtype: torch.dtype) -> int:
    """Largest possible frame carrying one ``[rows, hidden]`` tensor of ``dtype`` in ``num_segments``
    segments, with any header values, a tensor name of up to ``MAX_NAME_LEN`` chars and no meta.

    For gRPC's max message length add the size of any meta / extra tensors and some slack for the
    protobuf envelope.
    """
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype = {dtype}: expected one of {list(SUPPORTED_DTYPES)}")
    big = _INT_LIMIT - 1  # every int at its widest msgpack encoding (9 bytes)
    worst = {
        "v": FORMAT_VERSION,
        "kind": max(KINDS, key=len),
        "layer": big,
        "step": big,
        "mb": big,
        "pv": big,
        "experts": [],
        "counts": [],
        "tensors": [
            {
                "name": "n" * MAX_NAME_LEN,
                "dtype": max(SUPPORTED_DTYPES, key=len),
                "shape": [big, big],
                "nbytes": big,
            }
        ],
    }
    # Each list grows from a 1-byte fixarray header to at most a 5-byte array32 header plus 9 bytes per int.
    header = len(msgpack.packb(worst, use_bin_type=True)) + 2 * (4 + 9 * num_segments)
    return PREFIX_BYTES + header + (ALIGNMENT - 1) + rows * hidden * dtype.itemsize


# --------------------------------------------------------------------------------------------------
# expected frames: a reply whose every header field the receiver already knows


class ExpectedFrame(NamedTuple):
    """The frame a well-behaved peer answers with, known before it arrives: `head` is every byte in front of its
    one tensor (prefix, header, zero padding) exactly as encode_frame writes them; `nbytes` the whole frame."""

    head: bytes
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def expected_frame(kind: str, *, layer: int, step: int, mb: int, pv: int, experts: Sequence[int],
                   counts: Sequence[int], name: str, dtype: torch.dtype, shape: Sequence[int]) -> ExpectedFrame:  # fmt: skip
    """What encode_frame writes for a frame of these fields carrying one tensor `name` of `dtype` and `shape` (no
    meta), for `decode_expected`. The fields must be valid (they come from a frame this side built)."""
    shape = tuple(map(int, shape))
    nbytes = math.prod(shape) * dtype.itemsize
    specs = [{"name": name, "dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "nbytes": nbytes}]
    packed = _packer().pack(_header_obj(kind, layer, step, mb, pv, list(experts), list(counts), specs, None))
    offset = _align(PREFIX_BYTES + len(packed))
    head = b"".join((MAGIC, len(packed).to_bytes(4, "little"), packed, bytes(offset - PREFIX_BYTES - len(packed))))
    return ExpectedFrame(head, offset + nbytes, dtype, shape)


def decode_expected(buf: bytes | bytearray | memoryview, expected: ExpectedFrame) -> torch.Tensor | None:
    """The tensor of `buf` (a zero-copy view, as decode_frame gives it with out_dtype=None) when `buf` is exactly
    the expected frame's bytes up to its tensor and has its length; None otherwise (then decode_frame it: it is
    another valid encoding of the same answer, or a wrong one, and decode_frame names what is wrong). One
    comparison of ~100 bytes instead of a header parse: the caller's whole check of a reply."""
    mv = _as_byte_view(buf)
    n = len(expected.head)
    if mv.nbytes != expected.nbytes or mv[:n] != expected.head:
        return None
    numel = (expected.nbytes - n) // expected.dtype.itemsize
    if not numel:
        return torch.empty(expected.shape, dtype=expected.dtype)
    t = _frombuffer(mv, expected.dtype, numel, n)
    return t.view(*expected.shape) if expected.shape else t.view(())
