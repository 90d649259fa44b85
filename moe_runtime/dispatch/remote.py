"""RemoteDispatcher: the experts of one MoE layer live on expert actors, reached over gRPC.

Drops into MoELayer in place of LocalDispatcher: forward(x_nd, plan, ctx) -> y_nd, token copies in plan order. Per
call it sends one frame per destination actor (plan.destinations), all in flight at once (`fan_out`: grpc.aio
calls gathered on one shared event loop, a lone destination called blocking), then assembles y from the replies
(checked against the header each must carry, codec.expected_frame: one comparison, a full decode otherwise): one
torch.cat of the reply views on the CPU, a copy into each row range of the staging buffer on a GPU (MoELayer's
inference calls `dispatch_combine` instead: combine straight from the reply views, each reply as it arrives). It is a
torch.autograd.Function, so loss.backward() sends the grad of the outputs back through Backward to the same actors
(the ones of the forward, even if the placement is refreshed in between) and gets the grad of the inputs; the model
code does not change (a forward that records no graph skips the Function).

Step context: every forward needs a `StepContext` (step, micro-batch), passed down by the model; it is captured
in the autograd context at forward time, so backward uses the key (step, micro-batch, layer, worker) the server
saved the activations under.

Device: x may live on a GPU (the router worker's dense model). `HostStaging` (model/device.py) then casts it to
the wire dtype on the device and makes one device-to-host copy into a pinned buffer that the frames are encoded
from, and the replies are copied into a pinned host output that goes to the device in one non_blocking copy. On
the CPU those calls are the identity and a plain torch.empty: the CPU path is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from moe_runtime.dispatch.codec import (
    ExpectedFrame,
    FrameError,
    decode_expected,
    decode_frame,
    encode_frame,
    encode_frame_parts,
    expected_frame,
)
from moe_runtime.dispatch.envelope import envelope_prefix
from moe_runtime.dispatch.client import ExpertCallError, ExpertClient
from moe_runtime.dispatch.failover import Failover
from moe_runtime.dispatch.fanout import CallPipeline, ExpertCall, PendingFanOut, fan_out, fan_out_async
from moe_runtime.model.device import HostStaging
from moe_runtime.model.moe_layer import StepContext
from moe_runtime.model.plan import DispatchPlan
from moe_runtime.placement import Placement

__all__ = ["PendingRemoteExperts", "RemoteDispatcher"]

_WIRE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class RemoteDispatcher(nn.Module):
    def __init__(
        self,
        layer_index: int,
        placement: Placement,
        clients: Sequence[ExpertClient],
        wire_dtype: torch.dtype = torch.float32,
        worker_id: int = 0,
        failover: Failover | None = None,
    ):
        super().__init__()
        self.failover = failover  # inference forwards route around down actors (dispatch/failover.py)
        if wire_dtype not in _WIRE_DTYPES:
            raise ValueError(f"wire_dtype = {wire_dtype}: expected one of {[str(d) for d in _WIRE_DTYPES]}")
        if worker_id < 0:
            raise ValueError(f"worker_id = {worker_id}: expected >= 0")
        self.layer_index = layer_index
        self.wire_dtype = wire_dtype
        self.worker_id = worker_id  # keys the server's saved activations apart from other router workers'
        self.placement = placement
        self.clients: list[ExpertClient] = []
        self.refresh_placement(placement, clients)

    def refresh_placement(self, placement: Placement, clients: Sequence[ExpertClient] | None = None) -> None:
        """Switch to a new placement (and actor clients, index = actor id) between steps."""
        clients = list(self.clients if clients is None else clients)
        if len(clients) != placement.num_actors:
            raise ValueError(f"got {len(clients)} clients: placement has {placement.num_actors} actors")
        if not 0 <= self.layer_index < placement.num_layers:
            raise ValueError(f"layer_index = {self.layer_index}: placement has {placement.num_layers} layers")
        self.placement, self.clients = placement, clients

    def forward(self, x_nd: torch.Tensor, plan: DispatchPlan, ctx: StepContext | None = None) -> torch.Tensor:
        exchange = self._exchange(x_nd, plan, ctx)
        if self.failover is not None and not exchange.save:  # inference: nothing kept, safe to re-send elsewhere
            return self.failover.forward(self, exchange, x_nd, plan)
        if not (x_nd.requires_grad and torch.is_grad_enabled()):  # no graph to record: skip autograd's Function
            return exchange.run("dispatch", x_nd)
        return _RemoteExperts.apply(x_nd, exchange)

    def dispatch_combine(self, x_nd: torch.Tensor, plan: DispatchPlan, ctx: StepContext | None,
                         weights_tk: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """plan.combine(self(x_nd, plan, ctx), weights_tk) [T, d], equal bit for bit (what MoELayer calls).
        Without a graph to record (inference) on the CPU in fp32, combine reads the reply views directly
        (plan.combine_parts): no joined y_nd, one pass over the rows fewer; with several destinations each frame
        is sent as soon as it is encoded and each reply combined as soon as it arrives. The dispatcher's plain
        forward hooks (runtime/router_worker.py's timer) still run around it, and see the combined output; with
        a Failover, the first failed call re-runs the exchange through it (nothing was kept: inference).
        Otherwise (training, a GPU, a wire or input dtype other than fp32, kwargs or global hooks, a Failover
        that already knows an actor of this plan is down) the two calls."""
        graph = torch.is_grad_enabled() and (x_nd.requires_grad or weights_tk.requires_grad)
        fp32 = x_nd.dtype == self.wire_dtype == torch.float32  # where combine_parts is bit-equal to combine
        if graph or not fp32 or not x_nd.is_cpu or not self._plain_hooks() or (
                self.failover is not None and any(d.actor in self.failover.down for d in plan.destinations)):  # fmt: skip
            return plan.combine(self(x_nd, plan, ctx), weights_tk)
        args = (x_nd, plan, ctx)
        for hook in self._forward_pre_hooks.values():
            hook(self, args)
        exchange = self._exchange(x_nd, plan, ctx)
        try:
            out = self._fused_exchange(exchange, x_nd, plan, weights_tk)
        except ExpertCallError as err:
            if self.failover is None:
                raise
            out = plan.combine(self.failover.forward(self, exchange, x_nd, plan, failed=err), weights_tk)
        for hook in self._forward_hooks.values():
            hook(self, args, out)
        return out

    def _plain_hooks(self) -> bool:
        """Only hooks the fused path can run itself: plain forward (pre-)hooks, no kwargs or global ones."""
        from torch.nn.modules import module as _m

        return not (self._forward_hooks_with_kwargs or self._forward_pre_hooks_with_kwargs
                    or self._forward_hooks_always_called or _m._global_forward_hooks
                    or _m._global_forward_pre_hooks)  # fmt: skip

    @staticmethod
    def _fused_exchange(exchange: _Exchange, x_nd: torch.Tensor, plan: DispatchPlan, weights_tk: torch.Tensor
                        ) -> torch.Tensor:  # fmt: skip
        if len(plan.destinations) > 1:  # each frame sent once encoded, each reply combined once it arrives
            launched = exchange.launch("dispatch", x_nd, pipeline=CallPipeline())
            try:
                return plan.combine_parts(_views_as_they_arrive(launched), weights_tk)
            except _UnexpectedReply:
                return plan.combine(exchange.collect(launched), weights_tk)  # the full checks name what is wrong
        launched = exchange.launch("dispatch", x_nd, blocking=True)  # replies: a list (waited for)
        views = exchange.reply_views(launched.replies, launched.expected)
        if views is not None:
            return plan.combine_parts(views, weights_tk) if views else plan.combine(x_nd, weights_tk)
        return plan.combine(exchange.collect(launched), weights_tk)

    def start(self, x_nd: torch.Tensor, plan: DispatchPlan, ctx: StepContext | None = None) -> PendingRemoteExperts:
        """Send this exchange and return at once; `.wait()` gives what `forward` returns. For two-batch overlap
        (model/two_batch.py): the other half computes while the frames travel, in forward and in backward."""
        exchange = self._exchange(x_nd, plan, ctx)
        return PendingRemoteExperts(_SendExperts.apply(x_nd, exchange), exchange)

    def _exchange(self, x_nd: torch.Tensor, plan: DispatchPlan, ctx: StepContext | None) -> _Exchange:
        if ctx is None:
            raise ValueError(
                f"RemoteDispatcher (layer {self.layer_index}): forward needs ctx = StepContext(step, micro_batch), "
                "the key the expert servers keep this forward's activations under: pass ctx to the model's "
                "forward / loss"
            )
        if plan.layer != self.layer_index:
            raise ValueError(f"plan is for layer {plan.layer}: this dispatcher serves layer {self.layer_index}")
        if plan.placement_version != self.placement.version:
            raise ValueError(
                f"plan was built with placement version {plan.placement_version}: dispatcher has "
                f"{self.placement.version}"
            )
        if x_nd.dim() != 2 or x_nd.shape[0] != plan.num_copies:
            raise ValueError(f"x_nd has shape {list(x_nd.shape)}: expected [{plan.num_copies}, d]")
        save = not ctx.inference and torch.is_grad_enabled() and x_nd.requires_grad  # inference keeps nothing
        return _Exchange(self, plan, ctx, save)


class _Exchange:
    """Everything one forward needs again in backward: a snapshot of clients, plan and step context."""

    __slots__ = ("backward_launched", "clients", "forward_launched", "layer", "mb", "meta", "plan", "save", "step",
                 "wire_dtype")

    def __init__(self, disp: RemoteDispatcher, plan: DispatchPlan, ctx: StepContext, save: bool):
        self.layer, self.clients, self.plan = disp.layer_index, disp.clients, plan
        self.step, self.mb, self.wire_dtype, self.save = ctx.step, ctx.micro_batch, disp.wire_dtype, save
        self.meta = {"src": disp.worker_id} if save else {"src": disp.worker_id, "save": False}
        self.forward_launched: _Launched | None = None  # two-batch overlap: sent, not yet collected
        self.backward_launched: _Launched | None = None

    def run(self, kind: str, x_nd: torch.Tensor) -> torch.Tensor:
        """One frame per destination, all in flight, replies copied into their row ranges of the output."""
        return self.collect(self.launch(kind, x_nd, blocking=True))

    def launch(self, kind: str, x_nd: torch.Tensor, blocking: bool = False, pipeline: CallPipeline | None = None
               ) -> _Launched:  # fmt: skip
        """Encode and send one frame per destination; `blocking` waits for the replies here (a lone destination
        is then called on this thread), else they arrive while the caller computes (two-batch overlap)."""
        send_kind, name, reply_kind, reply_name = (("dispatch", "x", "result", "y") if kind == "dispatch"
                                                   else ("backward", "dy", "grad", "dx"))  # fmt: skip
        plan = self.plan
        staging = HostStaging.shared(x_nd.device)
        x_host = staging.to_host(x_nd, self.wire_dtype)  # CPU: x_nd itself (the codec casts)
        meta = self.meta if kind == "dispatch" else {"src": self.meta["src"]}
        method = "Dispatch" if kind == "dispatch" else "Backward"
        requests, expected = [], []
        n, d = x_host.shape
        for dest in plan.destinations:
            experts, counts, start, stop = dest.experts, dest.counts, dest.start, dest.stop
            rows = x_host if start == 0 and stop == n else x_host[start:stop]  # one destination: no slice
            client = self.clients[dest.actor]
            # on a TCP lane the frame is sent as its parts, the rows from their own memory (no copy at all)
            frame = (encode_frame_parts if client.uses_lane() else encode_frame)(
                send_kind, layer=self.layer, step=self.step, mb=self.mb, pv=plan.placement_version,
                experts=experts, counts=counts, tensors={name: rows},
                wire_dtype=self.wire_dtype, meta=meta, validate=False,  # plan-built header; the server validates
                lead=envelope_prefix,  # the envelope in the same join: one copy of the rows
            )  # fmt: skip
            requests.append(ExpertCall(client, method, frame, self.layer, self.step, True))
            if pipeline is not None:  # sent now: this server starts while the next frame is encoded
                pipeline.send(requests[-1])
            # the reply's exact header: collect checks a reply by one comparison instead of a parse
            expected.append(expected_frame(reply_kind, layer=self.layer, step=self.step, mb=self.mb,
                                           pv=plan.placement_version, experts=experts, counts=counts,
                                           name=reply_name, dtype=self.wire_dtype, shape=(stop - start, d)))
        if pipeline is not None:
            replies: list[memoryview] | PendingFanOut | CallPipeline = pipeline
        else:
            replies = (fan_out(requests) if requests else []) if blocking else fan_out_async(requests)
        return _Launched(kind, method, requests, replies, x_nd.shape, x_nd.dtype, staging, expected)

    @staticmethod
    def reply_views(replies: list[memoryview], expected: list[ExpectedFrame]) -> list[torch.Tensor] | None:
        """The replies as read-only views of their tensors, in plan order, when every one is exactly its expected
        frame; None otherwise (`collect` then names what is wrong)."""
        views = []
        for data, exp in zip(replies, expected):
            v = decode_expected(data, exp)
            if v is None:
                return None
            views.append(v)
        return views

    def collect(self, launched: _Launched) -> torch.Tensor:
        """Wait for the replies of `launch` and copy them into their row ranges of the output."""
        reply_kind, reply_name = ("result", "y") if launched.kind == "dispatch" else ("grad", "dx")
        method = launched.method
        pending = launched.replies
        if isinstance(pending, list):
            replies = pending
        else:
            replies = pending.replies() if isinstance(pending, CallPipeline) else pending.result()
        if launched.staging.on_host and replies and launched.dtype == self.wire_dtype:
            # CPU, replies as expected: one torch.cat of the reply views (they are the output's row ranges, in
            # order) instead of an empty output plus a slice and a copy per destination
            views = self.reply_views(replies, launched.expected)
            if views is not None:
                return torch.cat(views)
        # taken here, not at launch: on CUDA the pinned buffer is reused, and two launches can be in flight
        out = launched.staging.host_buffer(launched.shape, launched.dtype)  # CPU: torch.empty
        for dest, (client, *_), data, exp in zip(self.plan.destinations, launched.requests, replies, launched.expected):
            t = decode_expected(data, exp)
            if t is not None:
                out[dest.start : dest.stop].copy_(t)
                continue
            try:  # not the expected bytes: a full decode names what is wrong (or accepts another valid encoding)
                reply = decode_frame(data, expected_kind=reply_kind, out_dtype=None)
                h = reply.header
                rows = dest.stop - dest.start
                t = reply.tensors.get(reply_name)
                if (h.layer, h.step, h.mb, list(h.experts), list(h.counts)) != (
                    self.layer, self.step, self.mb, dest.experts, dest.counts
                ) or t is None or tuple(t.shape) != (rows, out.shape[1]):  # fmt: skip
                    raise FrameError(
                        f"reply (layer {h.layer}, step {h.step}, mb {h.mb}, experts {list(h.experts)}, "
                        f"counts {list(h.counts)}, tensors {[s.name for s in h.tensors]}) does not answer "
                        f"the request (experts {dest.experts}, counts {dest.counts}, {rows} rows)"
                    )
            except FrameError as e:
                raise ExpertCallError(client.address, method, self.layer, self.step, None, f"bad reply: {e}")
            out[dest.start : dest.stop].copy_(t)
        return launched.staging.upload(out)  # CPU: out itself


class _UnexpectedReply(Exception):
    """A reply is not its expected frame (`_views_as_they_arrive`): the caller runs the full checks instead."""


def _views_as_they_arrive(launched: _Launched) -> Iterator[torch.Tensor]:
    """The tensor view of each reply of a pipelined launch, in plan order, each as soon as it has arrived. A failed
    call raises ExpertCallError once every call has finished (fan_out's rule); a reply that is not the expected
    frame raises _UnexpectedReply."""
    pipeline = launched.replies
    assert isinstance(pipeline, CallPipeline)
    for i, exp in enumerate(launched.expected):
        try:
            data = pipeline.reply(i)
        except ExpertCallError:
            pipeline.wait_all()
            raise
        v = decode_expected(data, exp)
        if v is None:
            raise _UnexpectedReply
        yield v


class _Launched(NamedTuple):
    """An exchange sent by `_Exchange.launch`, waiting for `collect`."""

    kind: str
    method: str
    requests: list[ExpertCall]
    replies: list[memoryview] | PendingFanOut | CallPipeline
    shape: torch.Size
    dtype: torch.dtype
    staging: HostStaging
    expected: list[ExpectedFrame]  # per request, the reply it should get (codec.expected_frame)


class _RemoteExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_nd: torch.Tensor, exchange: _Exchange) -> torch.Tensor:  # type: ignore[override]
        ctx.exchange = exchange
        return exchange.run("dispatch", x_nd.detach())

    @staticmethod
    def backward(ctx, dy_nd: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        exchange: _Exchange = ctx.exchange
        if not exchange.save:
            raise RuntimeError("RemoteDispatcher: backward through a forward that ran without grad")
        return exchange.run("backward", dy_nd), None


class PendingRemoteExperts:
    """A forward exchange started by `RemoteDispatcher.start`; `wait()` returns y_nd (autograd-connected)."""

    __slots__ = ("_exchange", "_sent")

    def __init__(self, sent: torch.Tensor, exchange: _Exchange):
        self._sent, self._exchange = sent, exchange

    def wait(self) -> torch.Tensor:
        return _ReceiveExperts.apply(self._sent, self._exchange)


class _SendExperts(torch.autograd.Function):
    """Forward: send the frames, return at once (a 0-element token linking to `_ReceiveExperts`). Backward: wait
    for the backward exchange `_ReceiveExperts.backward` started and return the grad of the inputs."""

    @staticmethod
    def forward(ctx, x_nd: torch.Tensor, exchange: _Exchange) -> torch.Tensor:  # type: ignore[override]
        ctx.exchange = exchange
        exchange.forward_launched = exchange.launch("dispatch", x_nd.detach())
        return x_nd.new_empty(0)

    @staticmethod
    def backward(ctx, _d_token: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        exchange: _Exchange = ctx.exchange
        launched, exchange.backward_launched = exchange.backward_launched, None
        if launched is None:
            raise RuntimeError("RemoteDispatcher: backward reached the send side before the receive side")
        return exchange.collect(launched), None


class _ReceiveExperts(torch.autograd.Function):
    """Forward: wait for the replies of `_SendExperts`. Backward: send the grad of the outputs and return at once;
    the autograd engine runs other ready work (the other half) before `_SendExperts.backward` waits for it."""

    @staticmethod
    def forward(ctx, token: torch.Tensor, exchange: _Exchange) -> torch.Tensor:  # type: ignore[override]
        ctx.exchange = exchange
        launched, exchange.forward_launched = exchange.forward_launched, None
        return exchange.collect(launched)

    @staticmethod
    def backward(ctx, dy_nd: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        exchange: _Exchange = ctx.exchange
        if not exchange.save:
            raise RuntimeError("RemoteDispatcher: backward through a forward that ran without grad")
        exchange.backward_launched = exchange.launch("backward", dy_nd.contiguous())
        return dy_nd.new_empty(0), None
