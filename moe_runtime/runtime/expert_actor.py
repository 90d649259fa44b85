"""ExpertActor: a Ray actor that owns (layer, expert) shards (ExpertShards), serves them (ExpertServer) and owns
their optimizer state.

Data plane: the router workers call the actor's gRPC server (Dispatch / Backward) directly; Ray never carries
activations. Control plane (Ray method calls from the driver, between steps): load / drop shards, read and set
weight grads (replica sums), squared grad norms (global clipping), the optimizer step, checkpoints, stats.

Optimizer: AdamW (moe_runtime/adamw.py: torch.optim.AdamW's update, bit for bit) built by `training.make_adamw`,
i.e. the oracle's exact hyper-parameters and groups.
Its parameters are `nn.Parameter` views sharing storage with the shards' live weight tensors, and their `.grad`
is the shards' live grad buffer, so `opt.step()` updates what the server computes with, in place. The oracle
holds each layer's experts stacked ([E, d, 2f]) as one parameter; AdamW with foreach=False is elementwise, so a
per-expert slice ([d, 2f], also in the decay group since dim >= 2) gets the identical update.

Ray options (set by cluster.py): num_gpus = cluster.gpus_per_expert_actor, num_cpus = cluster.cpus_per_actor
(0 by default: a num_gpus=1 actor would otherwise also take a CPU and starve a small machine),
max_restarts = cluster.max_restarts, max_task_retries = 0 (a control call is never silently replayed).
A restarted actor comes back empty with a new server port; the driver re-wires the router workers and reloads
every party from the last checkpoint (see cluster.py).

Device: `model.device.ComputeDevice.resolve(device, train.precision)`, device "auto" by default, i.e. "cuda" inside
an actor Ray gave a GPU (it sees only that one). Weights, grads, saved activations and AdamW state live there
(ExpertShards); everything this actor returns through Ray (state, grads) is a host copy, so the driver and
checkpoints never see device tensors. train.precision bf16 on a CPU actor is refused (model/device.py says why).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_runtime.config import RuntimeConfig
from moe_runtime.records import ActorInfo, ActorStepStats
from moe_runtime.dispatch.server import ExpertServer
from moe_runtime.dispatch.service import DEFAULT_MAX_MESSAGE_BYTES
from moe_runtime.checkpoint import training_state as ckpt
from moe_runtime.model.device import ComputeDevice, host_copy
from moe_runtime.model.weight_storage import check_trainable, expert_storage_dtype
from moe_runtime.runtime.expert_shards import ExpertShards
from moe_runtime.runtime.party_args import current_args
from moe_runtime.runtime.ray_env import pick_device
from moe_runtime.adamw import AdamW
from moe_runtime.training import make_adamw, set_lr

Key = tuple[int, int]


def max_message_bytes(cfg: RuntimeConfig) -> int:
    """transport.max_message_mb, or enough for the largest frame a training micro-batch can produce."""
    if cfg.transport.max_message_mb is not None:
        return cfg.transport.max_message_mb << 20
    t, m = cfg.train, cfg.model
    rows = t.batch_size * t.seq_len * m.max_copies_per_token  # whole global batch on one actor: an upper bound
    return max(DEFAULT_MAX_MESSAGE_BYTES, 2 * rows * m.hidden_size * 4 + (1 << 20))


def _param_name(key: Key, which: str) -> str:
    return ckpt.shard_key(key[0], key[1], which)


class ExpertActor:
    def __init__(self, config: dict, index: int, auth_token: str, device: str | None = None):
        config, auth_token = current_args(config, auth_token)  # a Ray restart after a relaunch: the latest ones
        self.cfg = RuntimeConfig.model_validate(config)
        self.index = index
        torch.set_num_threads(self.cfg.cluster.torch_threads)
        self.compute = ComputeDevice.resolve(device or pick_device(), self.cfg.train.precision)
        self.device = self.compute.device
        host = self.cfg.transport.host
        if self.cfg.cluster.ray_address is not None and host in ("127.0.0.1", "localhost"):
            import ray

            host = ray.util.get_node_ip_address()  # a real cluster: router workers may be on other machines
        self.shards = ExpertShards(device=self.compute, storage_dtype=expert_storage_dtype(self.cfg.model))
        self.server = ExpertServer(
            self.shards, host, 0, auth_token=auth_token, max_message_bytes=max_message_bytes(self.cfg),
            check_finite=self.cfg.transport.check_finite, threads=self.cfg.transport.server_threads,
        )  # fmt: skip
        self.address = self.server.start()
        self._params: dict[Key, tuple[nn.Parameter, nn.Parameter]] = {}
        self._opt: AdamW | None = None
        self._named: list[tuple[str, nn.Parameter]] = []
        self._last_stats: dict[str, float] = {}
        self._rebuild({})

    # ------------------------------------------------------------------ identity / health

    def info(self) -> ActorInfo:
        import ray

        return ActorInfo(
            index=self.index, pid=os.getpid(), node_id=ray.get_runtime_context().get_node_id(), address=self.address,
            gpu_ids=tuple(str(g) for g in ray.get_gpu_ids()), device=str(self.device),
            shards=tuple(sorted(self._params)), placement_version=self.shards.placement_version,
        )

    def ping(self) -> int:
        return os.getpid()

    # ------------------------------------------------------------------ shards

    def _rebuild(self, carried: Mapping[str, torch.Tensor]) -> None:
        """Re-bind parameters to the shards' (possibly new) tensors and rebuild AdamW with `carried` state."""
        weights = self.shards.weights()  # grads are bound in `apply`: buffers exist only once a backward ran
        params: dict[Key, tuple[nn.Parameter, nn.Parameter]] = {}
        for k in sorted(weights):
            p1, p2 = nn.Parameter(weights[k][0]), nn.Parameter(weights[k][1])  # views of the live tensors
            assert p1.data_ptr() == weights[k][0].data_ptr() and p2.data_ptr() == weights[k][1].data_ptr()
            params[k] = (p1, p2)
        self._params = params
        self._named = [(_param_name(k, w), p) for k, ps in params.items() for w, p in zip(("w1", "w2"), ps)]
        self._opt = None  # built at the first step (or now, to hold carried state): serving never needs one
        if carried:
            ckpt.load_optimizer_tensors(self._optimizer(), dict(self._named), carried)

    def _optimizer(self) -> AdamW:
        """AdamW over the hosted shards, built on first use (serving never needs one; cheap since moe_runtime/adamw.py
        no longer imports torch._dynamo, ~1 CPU-s)."""
        if self._opt is None:
            self._opt = make_adamw(self._named, self.cfg.train)
        return self._opt

    def prepare_training(self) -> None:
        """Build the optimizer now rather than in the first step (Cluster.prepare_training)."""
        self._optimizer()

    def _opt_state(self, keys: Iterable[Key]) -> dict[str, torch.Tensor]:
        if self._opt is None:  # not built yet: no state (as a fresh AdamW has none)
            return {}
        names = {id(p): _param_name(k, w) for k in keys for w, p in zip(("w1", "w2"), self._params[k])}
        return ckpt.optimizer_tensors(self._opt, names)

    def load_shards(self, shards: Mapping[Key, Mapping[str, torch.Tensor]], placement_version: int,
                    replace: bool = True) -> list[Key]:
        """Host these shards: {"w1", "w2"} plus optional AdamW state ("w1.exp_avg", ...). `replace` drops every
        other shard; otherwise shards already hosted keep their weights and optimizer state. Grads start at 0."""
        keys = [(int(k[0]), int(k[1])) for k in shards]
        kept = [] if replace else [k for k in self._params if k not in shards]
        carried = self._opt_state(kept)
        for k, d in zip(keys, shards.values()):
            for n, t in d.items():
                if n not in ("w1", "w2"):
                    w, f = n.split(".", 1)
                    carried[f"{_param_name(k, w)}.{f}"] = t
        self.shards.load({k: (d["w1"].clone(), d["w2"].clone()) for k, d in zip(keys, shards.values())},
                         replace=replace)
        self.shards.set_placement_version(placement_version)
        self._rebuild(carried)
        return sorted(self._params)

    def drop_shards(self, keys: Iterable[Key]) -> None:
        keys = {(int(a), int(b)) for a, b in keys}
        carried = self._opt_state([k for k in self._params if k not in keys])
        self.shards.drop(keys)
        self._rebuild(carried)

    def set_placement_version(self, version: int) -> None:
        self.shards.set_placement_version(version)

    def state(self, keys: Iterable[Key] | None = None) -> dict[Key, dict[str, torch.Tensor]]:
        """Weights + AdamW state of the given shards (all hosted if None), as independent copies."""
        keys = sorted(self._params) if keys is None else [(int(a), int(b)) for a, b in keys]
        out: dict[Key, dict[str, torch.Tensor]] = {}
        opt = self._opt_state(keys)
        for k in keys:
            p1, p2 = self._params[k]
            d = {"w1": host_copy(p1), "w2": host_copy(p2)}
            for w in ("w1", "w2"):
                for f in ckpt.OPT_FIELDS:
                    t = opt.get(f"{_param_name(k, w)}.{f}")
                    if t is not None:
                        d[f"{w}.{f}"] = t if t.device.type == "cpu" else t.to("cpu")  # already a copy
            out[k] = d
        return out

    # ------------------------------------------------------------------ step boundary

    def grads(self, keys: Iterable[Key]) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:
        g = self.shards.grads()
        return {(int(a), int(b)): (host_copy(g[(a, b)][0]), host_copy(g[(a, b)][1])) for a, b in keys}

    def set_grads(self, grads: Mapping[Key, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.shards.set_grads(grads)

    def grad_sq(self, keys: Iterable[Key]) -> float:
        """Sum of squared weight grads over `keys` (the logical experts this actor answers for in the norm)."""
        g = self.shards.grads()
        total = 0.0
        for a, b in keys:
            for t in g[(int(a), int(b))]:
                total += float(torch.linalg.vector_norm(t)) ** 2
        return total

    def apply(self, coef: float, lr: float, step: int) -> ActorStepStats:
        """Scale grads by the global clip coefficient, AdamW step at `lr`, zero grads, free the step."""
        t0, c0 = time.perf_counter(), time.thread_time()
        check_trainable(self.cfg.model)
        opt = self._optimizer()
        grads = self.shards.grads()  # the live buffers (zeros for shards no token reached)
        for k, (p1, p2) in self._params.items():
            p1.grad, p2.grad = grads[k]
        if coef < 1.0:
            for p1, p2 in self._params.values():
                p1.grad.mul_(coef)
                p2.grad.mul_(coef)
        set_lr(opt, lr)
        opt.step()
        self.shards.zero_grads()
        self.shards.end_step(step)
        st = self.server.stats()
        now = {k: st[k] for k in ("compute_s", "compute_cpu_s", "handler_cpu_s", "decode_s", "encode_s")}
        delta = {f"expert_{k}": max(0.0, v - self._last_stats.get(k, 0.0)) for k, v in now.items()}
        self._last_stats = now
        return ActorStepStats(optimizer_s=time.perf_counter() - t0, optimizer_cpu_s=time.thread_time() - c0, **delta)

    def abort(self, step: int) -> None:
        """Forget a failed step: free its activations and zero the grads."""
        self.shards.abort_step(step)
        self.shards.zero_grads()

    def token_counts(self, reset: bool = False) -> dict[Key, int]:
        return self.shards.expert_token_counts(reset=reset)

    def stats(self) -> dict[str, Any]:
        return {**self.server.stats(), **self.shards.stats(), **self.info().as_dict()}

    # ------------------------------------------------------------------ checkpoints

    def save(self, step_dir: str, keys: Iterable[Key]) -> dict:
        """Write the given shards (weights + AdamW state) to `step_dir`/experts-a{index}.safetensors."""
        keys = sorted((int(a), int(b)) for a, b in keys)
        rec = ckpt.write_expert_file(Path(step_dir) / f"experts-a{self.index}.safetensors", self.state(keys))
        return rec.to_dict()

    def load_checkpoint(self, step_dir: str, keys: Iterable[Key], placement_version: int) -> list[Key]:
        """Host exactly `keys`, read from the checkpoint in `step_dir` (files already verified by the driver)."""
        manifest = ckpt.load_manifest(step_dir, verify=False)
        shards = ckpt.read_expert_shards(manifest, keys)
        self.shards.abort_step(1 << 62)  # activations of an abandoned step are useless now
        return self.load_shards(shards, placement_version, replace=True)

    def load_hf(self, checkpoint: Any, keys: Iterable[Key], placement_version: int, replace: bool,
                party: str) -> Any:
        """Host `keys` read straight from an HF checkpoint's shard files (runtime/hf_loading.py); `replace` drops
        every other shard first. Fresh optimizer state. Returns hf_loading.PartyLoad."""
        from moe_runtime.runtime.hf_loading import read_experts_into

        report = read_experts_into(self.shards, checkpoint, keys, party, replace)
        self.shards.set_placement_version(placement_version)
        self._rebuild({})
        return report

    def write_hf(self, directory: str, plan: Any, keys: Iterable[Key], party: str) -> Any:
        """Write these shards' weights at their places in an HF export (hf_loading.save_cluster)."""
        from moe_runtime.runtime.hf_loading import write_experts

        return write_experts(self.shards.weights(), self.cfg.model, directory, plan, keys, party)

    def shutdown(self) -> None:
        self.server.stop(0)

    def reset(self, config: dict, index: int, auth_token: str) -> None:
        """Become a freshly started actor for `config` in this process (runtime/relaunch.py): no shard, optimizer
        state or server kept (the new server listens on a new port)."""
        self.server.stop(0)
        self.__init__(config, index, auth_token)
