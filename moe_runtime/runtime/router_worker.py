"""RouterWorker: a data-parallel Ray actor holding the dense model (embedding, LFA attention, norms, routers, head).

Each worker builds the model with `build_model(cfg.model, seed, dispatcher_factory=...)` where every MoE layer gets
a RemoteDispatcher (gRPC to the expert actors), then loads the dense weights the driver took from the in-process
model `build_model(cfg.model, seed)` (strict: every key of the remote model must be given, nothing else). So the
cluster starts from exactly the oracle's weights.

One step (the oracle's decomposition, training.py): the global batch of `step` is split into
W x M chunks (`chunk_rows`), worker w runs chunks [w*M, (w+1)*M), scaling each chunk's loss by 1/(W*M) before
backward; the chunk's `StepContext(step, mb)`, passed with its forward, keys the activations the expert servers
keep for backward. Then the dense grads are summed over workers (`sync_grads`: torch.distributed gloo, or
through the Ray object store when cluster.grad_sync = "ray"), the driver computes the global clip coefficient,
and every worker applies the identical AdamW step (`apply`).

Ray options (set by cluster.py): num_cpus = cluster.cpus_per_actor (0 by default),
num_gpus = cluster.gpus_per_router_worker (0 by default: Ray then hides every GPU from the worker, so it runs the
dense model on the CPU), max_restarts = cluster.max_restarts, max_task_retries = 0.

Device: `model.device.ComputeDevice.resolve("auto", train.precision)`; the dense model lives there, bf16 runs the
forward under autocast (fp32 master weights and AdamW state); the RemoteDispatchers stage device tensors through
pinned host buffers for the wire (dispatch/remote.py).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moe_runtime.config import RuntimeConfig
from moe_runtime.records import WorkerPass
from moe_runtime.data import DEFAULT_CACHE_DIR, BatchLoader
from moe_runtime.data_files import DocumentBatch, load_training_corpus
from moe_runtime.dispatch.client import ExpertCallError, ExpertClient
from moe_runtime.dispatch.failover import Failover
from moe_runtime.dispatch.remote import RemoteDispatcher
from moe_runtime.model.device import ComputeDevice
from moe_runtime.model.moe_layer import StepContext
from moe_runtime.model.transformer import MoETransformer, build_model
from moe_runtime.model.two_batch import two_batch_loss
from moe_runtime.checkpoint import training_state as ckpt
from moe_runtime.checkpoint.in_process import no_random_init
from moe_runtime.runtime.expert_actor import max_message_bytes
from moe_runtime.runtime.expert_mask import ExpertMask, MaskError, MaskingBackend
from moe_runtime.runtime.generation_host import CacheHost
from moe_runtime.runtime.hung_parties import late_address
from moe_runtime.placement import Placement
from moe_runtime.runtime.ray_env import pick_device
from moe_runtime.runtime.party_args import current_args
from moe_runtime.adamw import AdamW
from moe_runtime.training import chunk_rows, document_kwargs, make_adamw, set_lr


def expert_keys(cfg: RuntimeConfig) -> set[str]:
    """State-dict keys of the stacked expert weights in the in-process model (not part of the dense state)."""
    from moe_runtime.model.transformer import expert_param_name

    return {expert_param_name(layer, w) for layer in range(cfg.model.num_layers) for w in ("w1", "w2")}


def dense_state_from_full(full: torch.nn.Module, cfg: RuntimeConfig) -> dict[str, torch.Tensor]:
    """The in-process model's state dict without the expert weights."""
    experts = expert_keys(cfg)
    sd = full.state_dict()
    missing = experts - set(sd)
    if missing:
        raise KeyError(f"in-process model has no {sorted(missing)}: expert_param_name is out of sync")
    return {k: v.detach().clone() for k, v in sd.items() if k not in experts}


class DataPlaneError(RuntimeError):
    """A data-plane (gRPC) call to an expert actor failed inside a router worker. Carries ExpertCallError's
    message across Ray (ExpertCallError itself does not unpickle: its __init__ takes six arguments), and the
    server's address when the call ran past its deadline (`hung_address`: runtime/hung_parties.py)."""

    def __init__(self, message: str, hung_address: str | None = None):
        super().__init__(message)
        self.hung_address = hung_address

    def __reduce__(self):  # the address travels across Ray too
        return (type(self), (str(self), self.hung_address))

    @classmethod
    def of(cls, where: str, err: Exception) -> DataPlaneError:
        """`where: err`, with err's server address when err is an ExpertCallError past its deadline."""
        return cls(f"{where}: {err}", late_address(err))


class CollectiveError(RuntimeError):
    """The gloo all-reduce between router workers failed (a peer died or hung): a fault, recovered like one."""


class WorkerNotReady(RuntimeError):
    """This router worker has no dense weights yet (restarted by Ray, not yet repaired): it must not answer with
    random ones; the driver sends its rows to another worker (runtime/nodes.py)."""


class _Timer:
    """Forward/backward wall time of the MoE pieces of one worker, via module hooks."""

    def __init__(self, model: MoETransformer):
        self.t: dict[str, float] = {}
        self._open: dict[tuple[str, int], float] = {}
        for i, moe in enumerate(model.moe_layers):
            self._fwd(moe, "moe", i)
            self._fwd(moe.router, "router", i)
            self._fwd(moe.dispatcher, "dispatch", i)
            moe.dispatcher.register_full_backward_pre_hook(self._start("dispatch_bwd", i))
            moe.dispatcher.register_full_backward_hook(self._stop("dispatch_bwd", i))

    def _start(self, name: str, i: int):
        def hook(*_: Any) -> None:
            self._open[(name, i)] = time.perf_counter()

        return hook

    def _stop(self, name: str, i: int):
        def hook(*_: Any) -> None:
            t0 = self._open.pop((name, i), None)
            if t0 is not None:
                self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0

        return hook

    def _fwd(self, module: torch.nn.Module, name: str, i: int) -> None:
        module.register_forward_pre_hook(self._start(name, i))
        module.register_forward_hook(self._stop(name, i))

    def reset(self) -> dict[str, float]:
        t, self.t, self._open = self.t, {}, {}
        return t


class RouterWorker:
    def __init__(self, config: dict, index: int, auth_token: str):
        """Loads the corpus; the model is built by the first `set_placement` (it needs the actors' addresses),
        so the driver can start workers and expert actors at the same time."""
        config, auth_token = current_args(config, auth_token)  # a Ray restart after a relaunch: the latest ones
        self.cfg = cfg = RuntimeConfig.model_validate(config)
        self.index = index
        self.world = cfg.cluster.router_workers
        self.local = cfg.cluster.ray_address is None
        torch.set_num_threads(cfg.cluster.torch_threads)
        t = cfg.train
        self.compute = ComputeDevice.resolve(pick_device(), t.precision)
        self.device = str(self.compute.device)
        self._token = auth_token
        self.loader = BatchLoader(load_training_corpus(cfg.data, cfg.model, cache_dir=DEFAULT_CACHE_DIR),
                                  t.batch_size, t.seq_len, seed=t.seed)
        self.chunks = chunk_rows(t.batch_size, self.world * t.micro_batches)
        self.placement: Placement | None = None
        self.clients: list[ExpertClient] = []
        self.dispatchers: list[RemoteDispatcher] = []
        self.failover = Failover(cfg.transport.on_expert_failure)  # actors found down by inference forwards, until the driver re-wires us
        self.model: MoETransformer | None = None
        self.mask: ExpertMask | None = None  # experts routed around while they have no live replica (mask mode)
        self._generation: CacheHost | None = None  # decoding caches of the driver's RemoteBackend
        self.dense_loaded = False  # set by every dense loader; until then inference refuses (WorkerNotReady)

    def _build(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        wire = getattr(torch, cfg.transport.wire_dtype)

        def factory(layer: int) -> RemoteDispatcher:
            d = RemoteDispatcher(layer, self.placement, self.clients, wire_dtype=wire, worker_id=self.index,
                                 failover=self.failover)
            self.dispatchers.append(d)
            return d

        # Dense weights are not drawn (~4 s for the real-width slice's embeddings and attention): every dense loader
        # overwrites them (the driver sends the oracle's, a checkpoint's or a survivor's) and dense_loaded guards
        # every use until then
        with no_random_init():
            self.model = build_model(cfg.model, t.seed, dispatcher_factory=factory).to(self.device)
        self.mask = ExpertMask(self.model, self.failover, lambda: self.placement,
                               cfg.transport.on_expert_failure == "mask")
        self._opt: AdamW | None = None  # built at the first step: serving never needs one (`opt`)
        self.timer = _Timer(self.model)
        self._params = [p for p in self.model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ wiring

    def _clients(self, addresses: Sequence[str]) -> list[ExpertClient]:
        tc = self.cfg.transport
        chunk = None if tc.chunk_mb is None else max(1 << 12, int(tc.chunk_mb * (1 << 20)))  # chunked frames
        return [ExpertClient(a, self._token, tc.deadline_s, max_message_bytes(self.cfg), chunk_bytes=chunk,
                             lane=tc.lane == "tcp") for a in addresses]  # fmt: skip

    def set_placement(self, placement: dict, addresses: Sequence[str] | None = None) -> None:
        """Switch every dispatcher to a new placement (and, after an actor restart, new server addresses).
        The first call (addresses required) builds the model."""
        self.placement = Placement.from_dict(placement)
        if addresses is not None:
            old, self.clients = self.clients, self._clients(addresses)
            self.failover.reset()
            for c in old:
                c.close()
        if self.model is None:
            if addresses is None:
                raise RuntimeError("RouterWorker: the first set_placement needs the expert actors' addresses")
            self._build()
        for d in self.dispatchers:
            d.refresh_placement(self.placement, self.clients)
        self.mask.clear()  # healed or re-placed: a forward that still meets a lost expert masks it again
        self.model.set_expert_nodes(self.placement)  # node-limited routing selects by the placement's nodes

    def info(self) -> dict[str, Any]:
        import ray

        return {"index": self.index, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "device": self.device, "collective": dist.is_initialized()}

    def degraded(self, take_seen: bool = True) -> dict[str, list[tuple[int, int]]]:
        """(layer, expert) pairs: `masked` now, `seen` = masked in a forward or generation step since the last
        call that took them (mask mode; empty otherwise)."""
        if self.mask is None:
            return {"masked": [], "seen": []}
        return {"masked": self.mask.pairs(), "seen": self.mask.take_seen() if take_seen else []}

    def ping(self) -> int:
        return os.getpid()

    @property
    def opt(self) -> AdamW:
        """AdamW over the dense parameters, built on first use (serving never needs one; cheap since
        moe_runtime/adamw.py no longer imports torch._dynamo, ~1 CPU-s)."""
        if self._opt is None:
            self._opt = make_adamw(self.model.named_parameters(), self.cfg.train)
        return self._opt

    def prepare_training(self) -> None:
        """Build the optimizer now rather than in the first step (Cluster.prepare_training)."""
        _ = self.opt

    def _fresh_optimizer(self) -> None:
        """No optimizer state, no grads (a built optimizer keeps its parameter groups)."""
        if self._opt is not None:
            self._opt.state.clear()
        self.model.zero_grad(set_to_none=True)

    def _require_dense(self) -> None:
        if self.model is None or not self.dense_loaded:
            raise WorkerNotReady(f"router worker {self.index} (pid {os.getpid()}) has no dense weights yet")

    def rendezvous(self) -> str:
        """The gloo group's init_method; called on worker 0. Local mode: a FileStore in a fresh 0700 directory
        (torch's TCPStore listens on every interface, unauthenticated; a file store listens nowhere). A real
        cluster: tcp://<this node's ip>:<free port>."""
        import ray

        if self.local:
            import shutil
            import tempfile

            if getattr(self, "_store_dir", None):
                shutil.rmtree(self._store_dir, ignore_errors=True)  # the previous group's, now replaced
            self._store_dir = tempfile.mkdtemp(prefix="moe-gloo-")
            return f"file://{self._store_dir}/store"
        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return f"tcp://{host}:{s.getsockname()[1]}"

    def init_collective(self, init_method: str, timeout_s: float = 120.0, op_timeout_s: float | None = None) -> None:
        """Join the gloo group (every worker calls this concurrently); replaces a previous group. op_timeout_s: how
        long an all-reduce waits for a stopped peer (default timeout_s, which bounds the rendezvous)."""
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.local:
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's own connections on loopback too
        dist.init_process_group("gloo", init_method=init_method, rank=self.index,
                                world_size=self.world, timeout=timedelta(seconds=timeout_s))
        if op_timeout_s is not None:  # public API sets one timeout for both; torch's own setter splits them
            from torch.distributed.distributed_c10d import _set_pg_timeout

            _set_pg_timeout(timedelta(seconds=op_timeout_s))

    # ------------------------------------------------------------------ training

    def forward_backward(self, step: int) -> WorkerPass:
        """This worker's micro-batches of `step`: forward, backward (expert grads accumulate on the actors).
        Returns the chunk-mean lm / aux loss contributions, the expert load [L, E] and timings."""
        t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
        self._require_dense()
        t = self.cfg.train
        n = self.world * t.micro_batches
        self.mask.clear()  # training never masks: a lost expert fails the step (rollback / re-run as always)
        self.model.train()
        self.model.zero_grad(set_to_none=True)  # what the optimizer's zero_grad does: it holds every parameter
        self.timer.reset()
        inputs, targets = self.loader.batch(step)
        docs = self.loader.corpus.documents(inputs)  # packed documents (data.source files), else None
        mine = self.chunks[self.index * t.micro_batches : (self.index + 1) * t.micro_batches]
        lm, aux = 0.0, 0.0
        loads = []
        try:
            for mb, rows in enumerate(mine):
                with self.compute.autocast():  # fp32: disabled, a no-op
                    loss, ce, load_le = self._micro_batch_loss(inputs[rows].to(self.device),
                                                               targets[rows].to(self.device), StepContext(step, mb),
                                                               None if docs is None else docs.rows(rows))
                (loss / n).backward()
                lm += ce.item() / n
                aux += (loss - ce).item() / n
                loads.append(load_le)
        except ExpertCallError as err:
            self.model.zero_grad(set_to_none=True)
            raise DataPlaneError.of(f"router worker {self.index}, step {step}", err) from None
        tm = self.timer.reset()
        return WorkerPass(
            lm=lm, aux=aux, load_le=np.sum(loads, axis=0, dtype=np.int64), chunk_loads_le=tuple(loads),
            wall_s=time.perf_counter() - t0, main_cpu_s=time.thread_time() - c0,
            process_cpu_s=time.process_time() - p0, moe_s=tm.get("moe", 0.0), router_s=tm.get("router", 0.0),
            dispatch_s=tm.get("dispatch", 0.0), dispatch_bwd_s=tm.get("dispatch_bwd", 0.0),
        )

    def _micro_batch_loss(self, tokens_bs: torch.Tensor, targets_bs: torch.Tensor, ctx: StepContext,
                          docs: DocumentBatch | None = None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:  # fmt: skip
        """(loss, cross entropy, expert load [L, E]) of one micro-batch: whole, or as two pipelined halves whose
        expert exchanges overlap the other half's compute (transport.overlap = "two_batch", model/two_batch.py).
        `docs`: the rows' packed documents (data.source files)."""
        if self.cfg.transport.overlap == "two_batch":
            out = two_batch_loss(self.model, tokens_bs, targets_bs, ctx, **document_kwargs(
                None if docs is None else docs.to(self.device)))
            return out.loss, out.ce, out.load_le.cpu().numpy()
        loss, ce = self.model.loss(tokens_bs, targets_bs, ctx, **document_kwargs(
            None if docs is None else docs.to(self.device)))
        return loss, ce, self.model.expert_load().cpu().numpy()

    def set_overlap(self, mode: str) -> None:
        """Switch transport.overlap ("none" | "two_batch") between steps: benchmarks/step.py alternates the two on
        one cluster."""
        from moe_runtime.config import TransportConfig

        transport = TransportConfig.model_validate({**self.cfg.transport.model_dump(), "overlap": mode})
        self.cfg = self.cfg.model_copy(update={"transport": transport})

    def _flat_grads(self) -> torch.Tensor:
        parts = []
        for p in self._params:
            g = p.grad
            parts.append(g.detach().reshape(-1).to("cpu", torch.float32) if g is not None
                         else torch.zeros(p.numel(), dtype=torch.float32))
        present = torch.tensor([p.grad is not None for p in self._params], dtype=torch.float32)
        return torch.cat(parts + [present])

    def _set_flat_grads(self, flat: torch.Tensor) -> float:
        """Write summed grads back; a parameter no worker produced a grad for keeps None (like the oracle).
        Returns the squared norm of the dense grads."""
        present = flat[-len(self._params):]
        offset, sq = 0, 0.0
        for p, has in zip(self._params, present.tolist()):
            g = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if has > 0:
                p.grad = g.to(p.device, p.dtype).clone()
                sq += float(torch.linalg.vector_norm(p.grad)) ** 2
            else:
                p.grad = None
        return sq

    def sync_grads(self) -> dict[str, float]:
        """Sum the dense grads over workers with gloo; returns the dense squared grad norm."""
        t0 = time.perf_counter()
        flat = self._flat_grads()
        if self.world > 1:
            try:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            except RuntimeError as err:  # DistBackendError et al.: a peer died or hung mid-collective
                raise CollectiveError(f"router worker {self.index}: gloo all-reduce of the dense grads failed "
                                      f"(a peer worker died or stopped answering): {err}") from None
        sq = self._set_flat_grads(flat)
        return {"dense_sq": sq, "grad_sync_s": time.perf_counter() - t0}

    def local_grads(self) -> torch.Tensor:
        """This worker's flat dense grads (+ presence mask), for grad_sync = "ray" (the driver sums them)."""
        return self._flat_grads()

    def set_grads(self, flat: torch.Tensor) -> dict[str, float]:
        t0 = time.perf_counter()
        sq = self._set_flat_grads(flat)
        return {"dense_sq": sq, "grad_sync_s": time.perf_counter() - t0}

    def apply(self, coef: float, lr: float) -> dict[str, float]:
        t0 = time.perf_counter()
        if coef < 1.0:
            for p in self._params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        set_lr(self.opt, lr)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"optimizer_s": time.perf_counter() - t0}

    def abort(self) -> None:
        self.model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def generation(self, op: str, *args: Any) -> Any:
        """Cached decoding over this worker's model, caches kept here (runtime/generation_host.py): prefill,
        decode, join, free, stats."""
        if self._generation is None:
            self._generation = CacheHost(self.model, MaskingBackend(self.model, self.mask))
        self._require_dense()
        self.model.eval()
        try:
            return self._generation.call(op, *args)
        except (ExpertCallError, MaskError) as err:
            raise DataPlaneError.of(f"router worker {self.index}, generation {op}", err) from None

    def generation_reported(self, op: str, *args: Any) -> tuple[Any, list[tuple[int, int]], bool]:
        """generation(), plus the (layer, expert) mask it ran under and whether actors were found down
        (runtime/cluster_mask.ReportingBackend: degraded answers, a heal started)."""
        out = self.generation(op, *args)
        return out, self.mask.pairs(), bool(self.failover.down)

    @torch.no_grad()
    def forward_agreed(self, tokens: torch.Tensor, step: int = 0, docs: DocumentBatch | None = None,
                       down: Mapping[int, str] | None = None) -> dict[str, Any]:  # fmt: skip
        """forward() under the cluster's mask decision (runtime/cluster_mask.py): the actors `down` first, then
        the forward without widening on its own. {"logits": [B, S, V] or None (it met experts outside the mask),
        "masked": the (layer, expert) mask it ran under, "down": actors found down (actor -> why)}."""
        self._require_dense()
        self.model.eval()
        kw = document_kwargs(None if docs is None else docs.to(self.device))
        try:
            self.mask.adopt(down or {})
            with self.compute.autocast():
                logits = self.mask.run_once(lambda: self.model(tokens.to(self.device), StepContext(step), **kw).logits)
        except (ExpertCallError, MaskError) as err:
            raise DataPlaneError.of(f"router worker {self.index}, forward", err) from None
        return {"logits": None if logits is None else logits.to("cpu", torch.float32), "masked": self.mask.pairs(),
                "down": self.failover.down}

    # ------------------------------------------------------------------ state

    def dense_state(self) -> dict[str, torch.Tensor]:
        """Model tensors + AdamW state, flat (checkpoint format)."""
        return {k: v.detach().to("cpu").clone() for k, v in ckpt.dense_tensors(self.model, self._opt).items()}

    def save(self, step_dir: str) -> dict:
        return ckpt.write_tensor_file(Path(step_dir) / ckpt.DENSE_FILE, self.dense_state(), kind="dense").to_dict()

    def load_model_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """The dense weights (state-dict keys of the remote model, exactly: nothing missing, nothing extra);
        fresh optimizer state."""
        own = set(self.model.state_dict())
        missing, extra = sorted(own - set(state)), sorted(set(state) - own)
        if missing or extra:
            raise KeyError(f"dense state does not fit the remote model: missing {missing}, unexpected {extra}")
        self.model.load_state_dict(state, strict=True)
        self.dense_loaded = True
        self._fresh_optimizer()

    def load_dense(self, tensors: Mapping[str, torch.Tensor]) -> None:
        has_state = any(k.startswith("opt.") for k in tensors)  # else the optimizer starts fresh: no need to build it
        self._fresh_optimizer()
        ckpt.load_dense_tensors(self.model, self.opt if has_state else None, tensors)
        self.dense_loaded = True

    def load_hf(self, checkpoint: Any, party: str) -> Any:
        """The dense tensors straight from an HF checkpoint's shard files (runtime/hf_loading.py); fresh optimizer
        state. Returns hf_loading.PartyLoad."""
        from moe_runtime.runtime.hf_loading import read_dense_into

        report = read_dense_into(self.model, checkpoint, party)
        self.dense_loaded = True
        self._fresh_optimizer()
        return report

    def write_hf(self, directory: str, plan: Any, party: str) -> Any:
        """Write the dense tensors at their places in an HF export (hf_loading.save_cluster)."""
        from moe_runtime.runtime.hf_loading import write_dense

        return write_dense(self.model, self.cfg.model, directory, plan, party)

    def load_checkpoint(self, step_dir: str) -> None:
        manifest = ckpt.load_manifest(step_dir, verify=False)
        self.load_dense(ckpt.read_dense(manifest))

    def shutdown(self) -> None:
        for c in self.clients:
            c.close()
        if dist.is_initialized():
            dist.destroy_process_group()

    def reset(self, config: dict, index: int, auth_token: str) -> None:
        """Become a freshly started worker for `config` in this process (runtime/relaunch.py): no state kept."""
        self.shutdown()
        self.__init__(config, index, auth_token)
