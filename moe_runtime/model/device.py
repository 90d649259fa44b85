"""Where a party computes and in what precision (one rule for router workers, expert actors and tests), and the
host staging that moves data-plane tensors between that device and the wire.

`ComputeDevice.resolve(device, precision)` is the rule: device "auto" = "cuda" when torch sees a CUDA device, else
"cpu"; precision "fp32" computes in float32, "bf16" computes in bfloat16 on CUDA with float32 master weights and
optimizer state. bf16 on the CPU is refused (ValueError): bf16 matmul on a CPU without bf16 units is 60-500x slower
than fp32 (/work/shared/machine-notes.md), and silently computing in fp32 instead would report numbers of a run
that was not the one configured. bf16 as a *wire* dtype (transport.wire_dtype) is independent and works anywhere.

`HostStaging` is the data plane's device edge. On the CPU every method is the identity (or a plain `torch.empty`),
so the CPU path is byte for byte what it was before devices existed, yet runs through the same calls as the GPU:
- `to_device(x_host)`: copy into a reusable pinned host buffer, then ONE host-to-device copy (non_blocking, on a
  side stream that the compute stream waits for);
- `host_buffer(shape, dtype)` + `upload(buf)`: the same in two halves, for a caller that assembles the host tensor
  itself (the remote dispatcher copies each reply into its row range, then uploads once);
- `to_host(x_dev, dtype)`: cast on the device (the wire dtype: fewer bytes cross the link), ONE device-to-host copy
  into a reusable pinned buffer, wait for it; the result is valid until this thread's next `to_host`.
Buffers and streams are per thread (the expert server computes on several gRPC threads at once); a pinned buffer
is reused only after the copy that last read it has finished (a CUDA event per buffer).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = ["PRECISIONS", "ComputeDevice", "HostStaging", "host_copy"]

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ComputeDevice:
    """A party's device and compute dtype. Weights, grads and optimizer state are always float32 (master copies);
    `dtype` is what the matmuls run in."""

    device: torch.device
    dtype: torch.dtype = torch.float32

    @classmethod
    def resolve(cls, device: str | torch.device = "auto", precision: str = "fp32") -> ComputeDevice:
        if precision not in PRECISIONS:
            raise ValueError(f"train.precision = {precision!r}: expected one of {list(PRECISIONS)}")
        if isinstance(device, str) and device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device = {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N' ({e})") from None
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device = {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device = {device!r}: no CUDA device is visible to this process")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"device = {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        dtype = PRECISIONS[precision]
        if dtype == torch.bfloat16 and dev.type == "cpu":
            raise ValueError(
                "train.precision = 'bf16' on the CPU: expected 'fp32' (bf16 matmul on this CPU is 60-500x slower "
                "than fp32; bf16 stays available as a wire format, transport.wire_dtype: bfloat16)"
            )
        return cls(dev, dtype)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def mixed(self) -> bool:
        """True when compute runs in a lower precision than the float32 master weights."""
        return self.dtype != torch.float32

    def autocast(self) -> torch.autocast:
        """The autocast context of the dense model's forward (disabled in fp32: a no-op)."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.mixed)

    def __str__(self) -> str:
        return str(self.device) if not self.mixed else f"{self.device} ({str(self.dtype).removeprefix('torch.')})"


CPU = ComputeDevice(torch.device("cpu"))


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """An independent CPU copy of `t` (for the control plane: Ray, checkpoints); on the CPU exactly `t.clone()`."""
    return t.detach().clone() if t.device.type == "cpu" else t.detach().to("cpu", copy=True)


class _PinnedSlot:
    """One reusable pinned buffer (flat bytes) and the event of the last copy that used it."""

    __slots__ = ("buf", "event")

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None
        self.event: torch.cuda.Event | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()  # the previous copy from/to this buffer is done: safe to overwrite
            self.event = None
        nbytes = dtype.itemsize * _numel(shape)
        if self.buf is None or self.buf.numel() < nbytes:
            grow = max(nbytes, 2 * self.buf.numel()) if self.buf is not None else nbytes
            self.buf = torch.empty(grow, dtype=torch.uint8, pin_memory=True)
        return self.buf[:nbytes].view(dtype).view(shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class _ThreadState(threading.local):
    stream: torch.cuda.Stream | None = None
    h2d: _PinnedSlot | None = None
    d2h: _PinnedSlot | None = None


class HostStaging:
    """Moves data-plane tensors between the wire (host memory) and `device`; the identity on the CPU."""

    _shared: ClassVar[dict[torch.device, HostStaging]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.on_host = self.device.type == "cpu"
        self._tls = _ThreadState()
        self.h2d_bytes = 0  # bytes copied host -> device / device -> host (for stats and benchmarks)
        self.d2h_bytes = 0

    @classmethod
    def shared(cls, device: torch.device | str) -> HostStaging:
        """One staging per device per process (the dispatchers of all MoE layers share its buffers)."""
        staging = cls._shared.get(device)  # type: ignore[call-overload]  # every data-plane call: no lock once made
        if staging is not None:
            return staging
        device = torch.device(device)
        with cls._shared_lock:
            if device not in cls._shared:
                cls._shared[device] = cls(device)
            return cls._shared[device]

    def _state(self) -> _ThreadState:
        tls = self._tls
        if tls.stream is None:
            tls.stream = torch.cuda.Stream(device=self.device)
            tls.h2d, tls.d2h = _PinnedSlot(), _PinnedSlot()
        return tls

    # ---------------------------------------------------------------------------- host -> device

    def host_buffer(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A host tensor to fill and then `upload`: pinned and reused on CUDA, a fresh torch.empty on the CPU."""
        if self.on_host:
            return torch.empty(tuple(shape), dtype=dtype)
        st = self._state()
        assert st.h2d is not None
        return st.h2d.take(tuple(shape), dtype)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """`host` (from host_buffer) on the device: one non_blocking copy on the side stream; the current stream
        waits for it. The CPU returns `host` itself."""
        if self.on_host:
            return host
        st = self._state()
        assert st.stream is not None and st.h2d is not None
        main = torch.cuda.current_stream(self.device)
        out = torch.empty(host.shape, dtype=host.dtype, device=self.device)  # allocated on the main stream
        st.stream.wait_stream(main)  # `out`'s memory may still be in use by queued work on main
        with torch.cuda.stream(st.stream):
            out.copy_(host, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(st.stream)
        main.wait_event(ev)
        st.h2d.event = ev  # host buffer reusable once this copy is done
        self.h2d_bytes += host.nbytes
        return out

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (host memory, e.g. a view of a received frame) on the device; the CPU returns `x` itself."""
        if self.on_host:
            return x
        buf = self.host_buffer(x.shape, x.dtype)
        buf.copy_(x)
        return self.upload(buf)

    # ---------------------------------------------------------------------------- device -> host

    def to_host(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`x` in host memory, cast to `dtype` on the device first (CUDA only: on the CPU `x` itself is returned
        and the codec casts, as it always has). On CUDA the result is a pinned buffer of this thread, valid until
        its next to_host: encode it before then."""
        if self.on_host or x.device.type == "cpu":
            return x
        st = self._state()
        assert st.stream is not None and st.d2h is not None
        if dtype is not None and x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        x = x.contiguous()
        buf = st.d2h.take(tuple(x.shape), x.dtype)
        st.stream.wait_stream(torch.cuda.current_stream(self.device))  # x is computed on the main stream
        with torch.cuda.stream(st.stream):
            buf.copy_(x, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(st.stream)
        ev.synchronize()  # the host reads it next
        self.d2h_bytes += buf.nbytes
        return buf
