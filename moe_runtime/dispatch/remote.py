"""RemoteDispatcher: the experts of one MoE layer live on expert actors, reached over gRPC.

Drops into MoELayer in place of LocalDispatcher: forward(x_nd, plan, ctx) -> y_nd, token copies in plan order. Per
call it sends one frame per destination actor (plan.destinations), all in flight at once (`fan_out`: grpc.aio
calls gathered on one shared event loop, a lone destination called blocking), then copies each reply into its
row range of a preallocated y. It is a torch.autograd.Function, so loss.backward() sends the grad of the outputs
back through Backward to the same actors (the ones of the forward, even if the placement is refreshed in between)
and gets the grad of the inputs; the model code does not change.

Step context: every forward needs a `StepContext` (step, micro-batch), passed down by the model; it is captured
in the autograd context at forward time, so backward uses the key (step, micro-batch, layer, worker) the server
saved the activations under.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moe_runtime.dispatch.codec import FrameError, decode_frame, encode_frame
from moe_runtime.dispatch.client import ExpertCallError, ExpertClient
from moe_runtime.dispatch.fanout import ExpertCall, fan_out
from moe_runtime.model.moe_layer import StepContext
from moe_runtime.model.plan import DispatchPlan
from moe_runtime.placement import Placement

__all__ = ["RemoteDispatcher"]

_WIRE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class RemoteDispatcher(nn.Module):
    def __init__(
        self,
        layer_index: int,
        placement: Placement,
        clients: Sequence[ExpertClient],
        wire_dtype: torch.dtype = torch.float32,
        worker_id: int = 0,
    ):
        super().__init__()
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
        if x_nd.dim() != 2 or x_nd.shape[0] != plan.num_tokens * plan.top_k:
            raise ValueError(f"x_nd has shape {list(x_nd.shape)}: expected [{plan.num_tokens * plan.top_k}, d]")
        save = torch.is_grad_enabled() and x_nd.requires_grad
        return _RemoteExperts.apply(x_nd, _Exchange(self, plan, ctx, save))


class _Exchange:
    """Everything one forward needs again in backward: a snapshot of clients, plan and step context."""

    __slots__ = ("clients", "layer", "mb", "meta", "plan", "save", "step", "wire_dtype")

    def __init__(self, disp: RemoteDispatcher, plan: DispatchPlan, ctx: StepContext, save: bool):
        self.layer, self.clients, self.plan = disp.layer_index, disp.clients, plan
        self.step, self.mb, self.wire_dtype, self.save = ctx.step, ctx.micro_batch, disp.wire_dtype, save
        self.meta = {"src": disp.worker_id} if save else {"src": disp.worker_id, "save": False}

    def run(self, kind: str, x_nd: torch.Tensor) -> torch.Tensor:
        """One frame per destination, all in flight, replies copied into their row ranges of the output."""
        send_kind, reply_kind, name, reply_name = (
            ("dispatch", "result", "x", "y") if kind == "dispatch" else ("backward", "grad", "dy", "dx"))  # fmt: skip
        plan = self.plan
        out = torch.empty(x_nd.shape, dtype=x_nd.dtype)
        meta = self.meta if kind == "dispatch" else {"src": self.meta["src"]}
        destinations = plan.destinations
        method = "Dispatch" if kind == "dispatch" else "Backward"
        requests = []
        for dest in destinations:
            frame = encode_frame(
                send_kind, layer=self.layer, step=self.step, mb=self.mb, pv=plan.placement_version,
                experts=dest.experts, counts=dest.counts, tensors={name: x_nd[dest.start : dest.stop]},
                wire_dtype=self.wire_dtype, meta=meta, validate=False,  # plan-built header; the server validates
            )  # fmt: skip
            requests.append(ExpertCall(self.clients[dest.actor], method, frame, self.layer, self.step))
        for dest, (client, *_), data in zip(destinations, requests, fan_out(requests) if requests else []):
            try:
                reply = decode_frame(data, expected_kind=reply_kind, out_dtype=None)
                h = reply.header
                rows = dest.stop - dest.start
                t = reply.tensors.get(reply_name)
                if (h.layer, h.step, h.mb, list(h.experts), list(h.counts)) != (
                    self.layer, self.step, self.mb, dest.experts, dest.counts
                ) or t is None or tuple(t.shape) != (rows, x_nd.shape[1]):  # fmt: skip
                    raise FrameError(
                        f"reply (layer {h.layer}, step {h.step}, mb {h.mb}, experts {list(h.experts)}, "
                        f"counts {list(h.counts)}, tensors {[s.name for s in h.tensors]}) does not answer "
                        f"the request (experts {dest.experts}, counts {dest.counts}, {rows} rows)"
                    )
            except FrameError as e:
                raise ExpertCallError(client.address, method, self.layer, self.step, None, f"bad reply: {e}")
            out[dest.start : dest.stop].copy_(t)
        return out


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
