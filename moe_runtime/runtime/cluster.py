"""Cluster: the one public entry point for running the MoE model on Ray.

    with Cluster.start(load_config("cluster/local.yaml")) as c:
        result = c.train(50)              # TrainResult, same JSON as InProcessTrainer.run plus placement / load
        logits = c.forward(tokens)        # [B, S, V]
        c.checkpoint("runs/ckpt"); c.restore("runs/ckpt")
        print(c.status())

Parties: `expert_actors` ExpertActor (Ray actors in a placement group, one bundle each:
{"GPU": gpus_per_expert_actor, "CPU": cpus_per_actor}, strategy cluster.placement_strategy) and
`router_workers` RouterWorker (data parallel). The driver (this process) runs the control plane only.

One training step, as three control-plane phases around the data plane:
  A. every worker: forward + backward of its micro-batches (tokens go to the expert actors over gRPC; expert
     weight grads accumulate on the actors, dense grads on the workers);
  B. dense grads summed across workers (gloo all-reduce) || replicas of an expert get the sum of their grads
     (driver-mediated), then each actor reports the squared grad norm of the logical experts it answers for
     (the first replica of each expert: a replicated expert counts once);
  C. coef = clip_coefficient(sqrt(dense_sq + expert_sq), grad_clip), lr = lr_at(step); every party scales its
     grads by coef and takes its AdamW step.
This is the oracle's step (training.InProcessTrainer) distributed: same chunks, same loss scaling, same global
norm, same AdamW; losses match it to float rounding.

Failures (what is survived):
- An expert actor or router-worker process dies (killed, OOM, segfault) during a step or a checkpoint save: the
  failed call surfaces as RayActorError / ExpertCallError; Ray restarts the actor (cluster.max_restarts) in its
  placement-group bundle; the driver waits for every party to answer, re-wires the router workers to the new
  gRPC addresses, re-forms the gloo group, rolls *every* party back to the last automatic checkpoint
  (train.checkpoint_every; a step-0 checkpoint is written when training starts) and re-runs the steps since.
  Because a step is a pure function of (state, step), the final losses equal a run without the fault.
- A save interrupted half-way leaves the previous checkpoint as the one LATEST points to (checkpoint.py).
What is not survived: death of the driver (it holds the control plane; restart it and `restore` the last
checkpoint), loss of the checkpoint storage, more failures than max_restarts per actor, a failure with
checkpoint_every = 0 (nothing to roll back to: the error is raised), and deterministic errors (a bug fails again
after rollback; after `max_recoveries` attempts without progress the original error is raised). A worker hung
inside a gloo all-reduce whose peer died is released only by the gloo timeout (COLLECTIVE_TIMEOUT_S).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moe_runtime.config import RuntimeConfig, load_config
from moe_runtime.data import load_corpus, val_batches
from moe_runtime.dispatch.grpc_service import ExpertCallError
from moe_runtime.model.transformer import build_model, expert_param_name
from moe_runtime.runtime import checkpoint as ckpt
from moe_runtime.runtime.expert_actor import ExpertActor
from moe_runtime.placement import Placement
from moe_runtime.runtime.ray_env import ClusterStartError, RayEnv, check_layout, start_ray
from moe_runtime.runtime.router_worker import DataPlaneError, RouterWorker, dense_state_from_full
from moe_runtime.scheduler.hook import SchedulerHook
from moe_runtime.training import ProgressFn, TrainResult, clip_coefficient, lr_at

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 120.0  # any control-plane call (load, save, optimizer step, ...)
START_TIMEOUT_S = 180.0  # actors up and placement group ready
COLLECTIVE_TIMEOUT_S = 60.0
FREE_WAIT_S = 10.0  # how long shutdown waits for Ray to take its placement group back

Key = tuple[int, int]


class ClusterError(RuntimeError):
    """A cluster operation failed and could not be recovered."""


@dataclass
class StepReport:
    step: int
    loss: float  # mean lm (cross-entropy) loss over the global batch
    aux: float  # mean aux (load-balancing) loss
    expert_load: torch.Tensor  # [L, E] token copies per expert in this step
    timings: dict[str, float] = field(default_factory=dict)
    # [L, E] per chunk (chunk = worker x micro-batches + micro-batch, the order a routing trace uses): which
    # worker sent what, for recording exact traces (sim.traces); sums to expert_load
    worker_loads: list[torch.Tensor] = field(default_factory=list)


def check_config(cfg: RuntimeConfig) -> None:
    """Every static check of a cluster config; raises ClusterStartError before anything starts."""
    c, t = cfg.cluster, cfg.train
    chunks = c.router_workers * t.micro_batches
    problems = []
    if t.batch_size % chunks:
        problems.append(
            f"train.batch_size = {t.batch_size}: must be a multiple of cluster.router_workers x train.micro_batches "
            f"= {c.router_workers} x {t.micro_batches} = {chunks} (every chunk the same size)"
        )
    if c.grad_sync == "gloo" and c.ray_address is None and c.num_nodes == 1 and c.router_workers > 64:
        problems.append(f"cluster.router_workers = {c.router_workers}: more than 64 gloo ranks on one machine")
    if problems:
        raise ClusterStartError("invalid cluster config:\n" + "\n".join(problems))
    check_layout(c)


def _is_fault(err: BaseException) -> bool:
    """A party died or the data plane failed: recoverable by restart + rollback."""
    import ray.exceptions as rex

    seen = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (rex.RayActorError, rex.GetTimeoutError, ExpertCallError, DataPlaneError,
                          rex.ObjectLostError)):
            return True
        if isinstance(e, rex.RayTaskError) and isinstance(e.cause, (ExpertCallError, DataPlaneError)):
            return True
        e = e.__cause__ or getattr(e, "cause", None)
    return False


class Cluster:
    def __init__(self, cfg: RuntimeConfig, env: RayEnv, pg: Any, experts: list[Any], workers: list[Any],
                 placement: Placement, infos: list[dict], token: str):
        self.cfg = cfg
        self.env = env
        self._pg = pg
        self.experts = experts
        self.workers = workers
        self.placement = placement
        self.actor_infos = infos
        self._token = token
        self.step = 0  # optimizer steps taken = the next step to run
        self.recoveries = 0
        self.last_checkpoint: Path | None = None
        self._closed = False
        self._corpus = None
        self.scheduler = SchedulerHook(cfg)  # load tracking + rebalancing (scheduler.enabled)

    # ================================================================== start / stop

    @classmethod
    def start(cls, config: RuntimeConfig | str | Path) -> Cluster:
        """Start (or join) Ray, place and start every actor, load the oracle's initial weights."""
        cfg = config if isinstance(config, RuntimeConfig) else load_config(config)
        check_config(cfg)
        t_start = time.perf_counter()
        env = start_ray(cfg.cluster)
        import ray

        log.info("ray up in %.1f s (%s)", time.perf_counter() - t_start, env.mode)

        pg = None
        created: list[Any] = []
        try:
            c = cfg.cluster
            token = cfg.transport.auth_token or secrets.token_hex(16)
            conf = cfg.model_dump(mode="json")
            bundle = {k: v for k, v in (("GPU", c.gpus_per_expert_actor), ("CPU", c.cpus_per_actor)) if v > 0}
            if bundle:
                from ray.util.placement_group import placement_group, remove_placement_group

                free = ray.available_resources()
                short = {k: v * c.expert_actors for k, v in bundle.items()
                         if v * c.expert_actors > free.get(k, 0.0) + 1e-9}
                if short:  # fail now rather than wait for a placement group that cannot be satisfied
                    raise ClusterStartError(
                        f"cluster.expert_actors = {c.expert_actors} need {short} but only "
                        f"{ {k: free.get(k, 0.0) for k in short} } are free in the Ray cluster "
                        f"(total {ray.cluster_resources()}); another cluster may hold the rest"
                    )

                pg = placement_group([dict(bundle) for _ in range(c.expert_actors)], strategy=c.placement_strategy)
                try:
                    ray.get(pg.ready(), timeout=START_TIMEOUT_S)
                except ray.exceptions.GetTimeoutError:
                    remove_placement_group(pg)
                    pg = None
                    raise ClusterStartError(
                        f"placement group of {c.expert_actors} x {bundle} ({c.placement_strategy}) not ready after "
                        f"{START_TIMEOUT_S:.0f} s: the Ray cluster has {ray.cluster_resources()}"
                    ) from None
            actor_cls = ray.remote(ExpertActor)
            experts = []
            for i in range(c.expert_actors):
                opts: dict[str, Any] = {"num_gpus": c.gpus_per_expert_actor, "num_cpus": c.cpus_per_actor,
                                        "max_restarts": c.max_restarts, "max_task_retries": 0}
                if pg is not None:
                    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                    opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                        placement_group=pg, placement_group_bundle_index=i)
                experts.append(actor_cls.options(**opts).remote(conf, i, token))
            created += experts

            worker_cls = ray.remote(RouterWorker)
            workers = [
                worker_cls.options(num_gpus=0, num_cpus=c.cpus_per_actor, max_restarts=c.max_restarts,
                                   max_task_retries=0).remote(conf, w, token)
                for w in range(c.router_workers)
            ]  # fmt: skip
            created += workers

            # The oracle's initial weights: the dense part goes to the workers, expert slices to the actors.
            full = build_model(cfg.model, seed=cfg.train.seed)
            dense_ref = ray.put(dense_state_from_full(full, cfg))
            sd = full.state_dict()
            shards = {
                (layer, e): {"w1": sd[expert_param_name(layer, "w1")][e].clone(),
                             "w2": sd[expert_param_name(layer, "w2")][e].clone()}
                for layer in range(cfg.model.num_layers) for e in range(cfg.model.num_experts)
            }  # fmt: skip
            del full, sd

            infos = _get([a.info.remote() for a in experts], START_TIMEOUT_S, "expert actors starting")
            log.info("%d expert actors up at %.1f s", len(experts), time.perf_counter() - t_start)
            nodes = sorted({i["node_id"] for i in infos})
            actor_nodes = tuple(nodes.index(i["node_id"]) for i in infos)
            placement = Placement.contiguous(cfg.model.num_layers, cfg.model.num_experts, c.expert_actors,
                                             actor_nodes)
            refs = [a.load_shards.remote({k: shards[k] for k in placement.shards_of(i)}, placement.version)
                    for i, a in enumerate(experts)]
            addresses = [i["address"] for i in infos]
            # dense weights by a call, not a constructor argument: a restarted worker must not depend on them
            refs += [w.set_placement.remote(placement.to_dict(), addresses) for w in workers]
            refs += [w.load_model_state.remote(dense_ref) for w in workers]
            _get(refs, START_TIMEOUT_S, "loading weights")
            del dense_ref
            log.info("%d router workers up at %.1f s", len(workers), time.perf_counter() - t_start)
            cluster = cls(cfg, env, pg, experts, workers, placement, infos, token)
            cluster._init_collective()
            return cluster
        except BaseException:
            for h in created:
                ray.kill(h, no_restart=True)
            if pg is not None:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(pg)
            env.shutdown()
            raise

    def _init_collective(self) -> None:
        if len(self.workers) > 1 and self.cfg.cluster.grad_sync == "gloo":
            host, port = _get(self.workers[0].rendezvous.remote(), CONTROL_TIMEOUT_S, "gloo rendezvous")
            _get([w.init_collective.remote(host, port, COLLECTIVE_TIMEOUT_S) for w in self.workers],
                 CONTROL_TIMEOUT_S, "gloo group")

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        import ray

        for h in self.workers + self.experts:
            try:
                ray.kill(h, no_restart=True)
            except ValueError as err:  # not an actor handle any more
                log.debug("kill: %s", err)
        if self._pg is not None:
            from ray.util.placement_group import placement_group_table, remove_placement_group

            remove_placement_group(self._pg)
            # removal is asynchronous: wait until the bundles' resources are gone so a next start sees the GPUs
            tag = self._pg.id.hex()
            deadline = time.monotonic() + FREE_WAIT_S
            while time.monotonic() < deadline and (
                placement_group_table(self._pg).get("state") != "REMOVED"
                or any(tag in k for k in ray.cluster_resources())
            ):
                time.sleep(0.05)
        self.env.shutdown()

    def __enter__(self) -> Cluster:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ================================================================== inference

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, V] for tokens [B, S]; rows are split over the router workers."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens has shape {list(tokens.shape)}: expected [batch, seq]")
        parts = torch.tensor_split(tokens, min(len(self.workers), tokens.shape[0]))
        refs = [w.forward.remote(p, self.step) for w, p in zip(self.workers, parts)]
        return torch.cat(_get(refs, CONTROL_TIMEOUT_S, "forward"))

    def evaluate(self) -> float:
        """Mean validation loss over train.val_batches fixed batches (the oracle's evaluate)."""
        t = self.cfg.train
        if self._corpus is None:
            self._corpus = load_corpus(self.cfg.data)
        batches = val_batches(self._corpus, t.val_batches, t.batch_size, t.seq_len)
        losses = []
        for x, y in batches:
            logits = self.forward(x)
            losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).item())
        return sum(losses) / len(losses)

    # ================================================================== training

    def _primary_keys(self) -> list[list[Key]]:
        """Per actor, the (layer, expert) pairs it answers for in norms and checkpoints (first replicas)."""
        out: list[list[Key]] = [[] for _ in range(self.placement.num_actors)]
        for layer, row in enumerate(self.placement.replicas):
            for e, actors in enumerate(row):
                out[actors[0]].append((layer, e))
        return out

    def _sum_replica_grads(self) -> None:
        import ray

        replicated = [((layer, e), actors) for layer, row in enumerate(self.placement.replicas)
                      for e, actors in enumerate(row) if len(actors) > 1]
        if not replicated:
            return
        want: dict[int, list[Key]] = {}
        for k, actors in replicated:
            for a in actors:
                want.setdefault(a, []).append(k)
        got = dict(zip(want, _get([self.experts[a].grads.remote(ks) for a, ks in want.items()],
                                  CONTROL_TIMEOUT_S, "replica grads")))
        summed: dict[int, dict[Key, tuple[torch.Tensor, torch.Tensor]]] = {}
        for k, actors in replicated:
            g1 = sum(got[a][k][0] for a in actors[1:]) + got[actors[0]][k][0]  # same order for every replica
            g2 = sum(got[a][k][1] for a in actors[1:]) + got[actors[0]][k][1]
            for a in actors:
                summed.setdefault(a, {})[k] = (g1, g2)
        ref = {a: ray.put(d) for a, d in summed.items()}
        _get([self.experts[a].set_grads.remote(r) for a, r in ref.items()], CONTROL_TIMEOUT_S, "set replica grads")

    def train_step(self, step: int | None = None) -> StepReport:
        """One optimizer step of the global batch of `step` (default: the next one). Raises on failure (no
        recovery here; `train` recovers).

        timings (seconds; concurrent parties overlap, so the parts are estimates that need not sum to step_s):
        router_s: dense compute on a router worker (mean over workers: forward/backward wall outside the
        dispatcher and combine); dispatch_s: dispatcher wall (forward + backward exchanges) minus expert_s, i.e.
        encode, gRPC, decode and waiting; expert_s: expert compute of the slowest actor (expert_cpu_s: all actors'
        compute wall time summed; expert_compute_cpu_s: their handler threads' CPU seconds in compute);
        combine_s: plan build + gather + combine (forward); grad_sync_s: dense grad all-reduce; optimizer_s:
        norms, replica sums, clip and AdamW on every party incl. their control-plane calls; control_s: phase A's
        Ray call overhead + worker imbalance."""
        import ray

        step = self.step if step is None else step
        t = self.cfg.train
        t0 = time.perf_counter()
        fb = _get([w.forward_backward.remote(step) for w in self.workers], _step_timeout(self.cfg),
                  f"step {step} forward/backward")
        t1 = time.perf_counter()
        driver_sync = 0.0
        if self.cfg.cluster.grad_sync == "gloo" or len(self.workers) == 1:
            sync_refs = [w.sync_grads.remote() for w in self.workers]
        else:  # through the driver and the object store
            flats = _get([w.local_grads.remote() for w in self.workers], CONTROL_TIMEOUT_S, "dense grads")
            total = flats[0].clone()
            for f in flats[1:]:
                total += f
            ref = ray.put(total)
            sync_refs = [w.set_grads.remote(ref) for w in self.workers]
            driver_sync = time.perf_counter() - t1
        self._sum_replica_grads()
        sq_refs = [a.grad_sq.remote(keys) for a, keys in zip(self.experts, self._primary_keys())]
        sync = _get(sync_refs, CONTROL_TIMEOUT_S + COLLECTIVE_TIMEOUT_S, "dense grad sync")
        expert_sq = sum(_get(sq_refs, CONTROL_TIMEOUT_S, "expert grad norms"))
        t2 = time.perf_counter()
        total_norm = math.sqrt(sync[0]["dense_sq"] + expert_sq)
        coef = clip_coefficient(total_norm, t.grad_clip)
        lr = lr_at(step, t)
        applied = _get([w.apply.remote(coef, lr) for w in self.workers]
                       + [a.apply.remote(coef, lr, step) for a in self.experts], CONTROL_TIMEOUT_S, "optimizer step")
        t3 = time.perf_counter()
        self.step = step + 1

        W = len(self.workers)
        load = sum((r["load"] for r in fb), torch.zeros_like(fb[0]["load"]))

        def mean(key: str) -> float:
            return sum(r.get(key, 0.0) for r in fb) / W

        # actors compute concurrently and each serves every worker: the slowest actor bounds the exchanges
        expert_cpu = [a.get("expert_compute_s", 0.0) for a in applied[W:]]
        expert_s = max(expert_cpu, default=0.0)
        dispatch_wall = mean("dispatch") + mean("dispatch_bwd")
        combine = max(0.0, mean("moe") - mean("router") - mean("dispatch"))
        grad_sync = driver_sync + sum(s["grad_sync_s"] for s in sync) / W
        timings = {
            "step_s": t3 - t0,
            "forward_backward_s": t1 - t0,
            "control_s": max(0.0, (t1 - t0) - max(r["fb_s"] for r in fb)),
            "router_s": max(0.0, mean("fb_s") - dispatch_wall - combine),
            "dispatch_s": max(0.0, dispatch_wall - expert_s),
            "expert_s": expert_s,
            "expert_cpu_s": sum(expert_cpu),
            "expert_compute_cpu_s": sum(a.get("expert_compute_cpu_s", 0.0) for a in applied[W:]),
            # the actors' request handlers' CPU (decode, compute, encode, bookkeeping) and optimizer CPU
            "expert_handler_cpu_s": sum(a.get("expert_handler_cpu_s", 0.0) for a in applied[W:]),
            "expert_optimizer_cpu_s": sum(a.get("optimizer_cpu_s", 0.0) for a in applied[W:]),
            # router workers' CPU seconds in forward/backward, all workers: the main thread (dense compute,
            # autograd, encode/decode) and the whole process (+ gRPC's and Ray's threads)
            "worker_main_cpu_s": sum(r.get("fb_cpu_s", 0.0) for r in fb),
            "worker_cpu_s": sum(r.get("fb_process_cpu_s", 0.0) for r in fb),
            "combine_s": combine,
            "grad_sync_s": grad_sync,
            "optimizer_s": (t3 - t2) + max(0.0, (t2 - t1) - grad_sync),
            "grad_norm": total_norm,
            "clip_coef": coef,
        }
        chunk_loads = [mb_load for r in fb for mb_load in r["loads"]]
        return StepReport(step, sum(r["lm"] for r in fb), sum(r["aux"] for r in fb), load, timings, chunk_loads)

    def train(self, steps: int | None = None, progress: ProgressFn | None = None,
              max_recoveries: int | None = None, record_trace: str | Path | None = None) -> TrainResult:
        """Train from the current step up to `steps` (default train.steps) with automatic checkpoints every
        train.checkpoint_every steps (plus one at the start) and rollback-and-replay on faults. `record_trace`:
        write the routing of every completed step (per worker and micro-batch) there, a trace the simulator
        replays (``.npz`` or ``.jsonl``; trace step i = the i-th step of this call)."""
        t = self.cfg.train
        if record_trace is not None and Path(record_trace).suffix not in (".npz", ".jsonl"):
            raise ValueError(f"record_trace = {str(record_trace)!r}: expected a path ending in .npz or .jsonl")
        chunk_loads: dict[int, list[torch.Tensor]] = {}  # a replayed step (after a rollback) overwrites
        steps = t.steps if steps is None else steps
        every = t.checkpoint_every
        root = Path(t.checkpoint_dir).resolve()
        limit = self.cfg.cluster.max_restarts if max_recoveries is None else max_recoveries
        losses: dict[int, float] = {}
        auxes: dict[int, float] = {}
        times: dict[int, float] = {}
        loads: dict[int, torch.Tensor] = {}
        timing_sum: dict[str, float] = {}
        first = self.step
        failures_here = 0
        if every:
            self.checkpoint(root)
        while self.step < steps:
            step = self.step
            try:
                rep = self.train_step(step)
                self.scheduler.observe(self, step, rep.expert_load)  # may migrate experts
                if every and self.step % every == 0:
                    self.checkpoint(root)
            except BaseException as err:
                if not (every and _is_fault(err)):
                    raise
                failures_here += 1
                if failures_here > limit:
                    raise ClusterError(f"step {step}: {failures_here} recoveries without progress; giving up") from err
                log.warning("step %d failed (%s); rolling back to the last checkpoint", step, err)
                self._recover(root)
                continue
            failures_here = 0
            losses[step], auxes[step], times[step] = rep.loss, rep.aux, rep.timings["step_s"]
            loads[step] = rep.expert_load
            chunk_loads[step] = rep.worker_loads
            for k, v in rep.timings.items():
                timing_sum[k] = timing_sum.get(k, 0.0) + v
            if progress:
                progress(step, rep.loss)
        done = sorted(s for s in losses if s >= first)
        n = max(1, len(done))
        load_sum = sum((loads[s] for s in done), torch.zeros(self.cfg.model.num_layers, self.cfg.model.num_experts,
                                                             dtype=torch.long))
        tokens = len(done) * t.batch_size * t.seq_len
        extra_trace = {}
        if record_trace is not None and done:
            extra_trace["trace"] = str(self._save_trace(record_trace, [chunk_loads[s] for s in done]))
        return TrainResult(
            losses=[losses[s] for s in done],
            val_loss=self.evaluate(),
            tokens_per_s=tokens / max(sum(times[s] for s in done), 1e-9),
            router=self.cfg.model.router,
            expert_load=load_sum.tolist(),
            aux_losses=[auxes[s] for s in done],
            step_times_s=[times[s] for s in done],
            extra={
                "placement": self.placement.to_dict(),
                "actor_load": self._actor_load(load_sum),
                "recoveries": self.recoveries,
                "mean_timings": {k: v / n for k, v in timing_sum.items()},
                "expert_actors": len(self.experts),
                "router_workers": len(self.workers),
                "last_decision": self.scheduler.last_decision_str,
                "rebalances": self.scheduler.rebalances,
                **extra_trace,
            },
        )

    def _save_trace(self, path: str | Path, steps: list[list[torch.Tensor]]) -> Path:
        from moe_runtime.sim.traces import TraceRecorder

        m = self.cfg.model
        rec = TraceRecorder(m.num_layers, m.num_experts, m.top_k, self.cfg.train.micro_batches,
                            meta={"source": "cluster", "preset": m.preset, "router_workers": len(self.workers),
                                  "expert_actors": len(self.experts)})  # fmt: skip
        for i, loads in enumerate(steps):
            for chunk, load_le in enumerate(loads):
                rec.record_layers(i, chunk, load_le)
        return rec.trace().save(path)

    def _actor_load(self, load: torch.Tensor) -> list[int]:
        """Token copies served per actor for an [L, E] load (a replicated expert's copies split evenly)."""
        out = [0] * self.placement.num_actors
        for layer, row in enumerate(self.placement.replicas):
            for e, actors in enumerate(row):
                n = int(load[layer, e])
                base, extra = divmod(n, len(actors))
                for i, a in enumerate(actors):
                    out[a] += base + (i < extra)
        return out

    # ================================================================== faults

    def _wait_alive(self, timeout: float = START_TIMEOUT_S) -> list[dict]:
        """Ping every party until it answers (restarted actors come back empty); returns fresh expert infos."""
        import ray

        deadline = time.monotonic() + timeout
        for h in self.workers + self.experts:
            while True:
                try:
                    ray.get(h.ping.remote(), timeout=max(1.0, min(30.0, deadline - time.monotonic())))
                    break
                except ray.exceptions.ActorDiedError as err:
                    raise ClusterError(f"an actor died for good (max_restarts exhausted): {err}") from err
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                    if time.monotonic() > deadline:
                        raise ClusterError(f"actors did not come back within {timeout:.0f} s") from err
                    time.sleep(0.2)
        return _get([a.info.remote() for a in self.experts], CONTROL_TIMEOUT_S, "expert actor info")

    def recover(self, path: str | Path | None = None) -> int:
        """After a failure outside `train` (e.g. a failed `checkpoint`): wait for every party, re-wire, and roll
        back to the last checkpoint under `path` (default train.checkpoint_dir). Returns the restored step."""
        self._recover(Path(path if path is not None else self.cfg.train.checkpoint_dir).resolve())
        return self.step

    def _recover(self, root: Path) -> None:
        """Bring every party back and roll back to the last committed checkpoint under `root`."""
        t0 = time.perf_counter()
        self.actor_infos = self._wait_alive()
        addresses = [i["address"] for i in self.actor_infos]
        _get([w.set_placement.remote(self.placement.to_dict(), addresses) for w in self.workers], CONTROL_TIMEOUT_S,
             "re-wiring router workers")
        self._init_collective()
        step = self.restore(root)
        self.recoveries += 1
        log.warning("recovered in %.1f s: resuming at step %d", time.perf_counter() - t0, step)

    # ================================================================== checkpoints

    def checkpoint(self, path: str | Path | None = None) -> Path:
        """Save every party's state at the current step under `path` (a checkpoint root); returns the step dir."""
        root = Path(path if path is not None else self.cfg.train.checkpoint_dir).resolve()
        d = ckpt.new_step_dir(root, self.step)
        keys = self._primary_keys()
        refs = [self.workers[0].save.remote(str(d))]
        refs += [a.save.remote(str(d), ks) for a, ks in zip(self.experts, keys) if ks]
        recs = [ckpt.FileRecord.from_dict(r) for r in _get(refs, CONTROL_TIMEOUT_S, "checkpoint save")]
        manifest = ckpt.Manifest(step=self.step, config=self.cfg.model_dump(mode="json"),
                                 placement=self.placement.to_dict(), files=recs)
        ckpt.commit(d, manifest)
        self.last_checkpoint = d
        return d

    def restore(self, path: str | Path) -> int:
        """Load a checkpoint (root or step dir) into every party, on this cluster's actors whatever their number;
        returns the restored step (the next one to run)."""
        m = ckpt.load_manifest(Path(path).resolve(), verify=True)
        mine = self.cfg.model.model_dump(mode="json")
        if m.config.get("model") != mine:
            raise ckpt.CheckpointError(f"checkpoint {m.directory} is for model {m.config.get('model')}, not {mine}")
        A = len(self.experts)
        nodes = self.placement.actor_nodes
        version = self.placement.version + 1
        saved = Placement.from_dict(m.placement)
        if saved.num_actors == A and saved.num_layers == self.cfg.model.num_layers:
            placement = Placement(A, saved.replicas, max(version, saved.version + 1), nodes)
        else:  # a different number of actors: re-shard contiguously (shards are keyed by (layer, expert))
            placement = Placement(A, Placement.contiguous(self.cfg.model.num_layers, self.cfg.model.num_experts,
                                                          A).replicas, version, nodes)
        d = str(m.directory)
        refs = [a.load_checkpoint.remote(d, placement.shards_of(i), placement.version)
                for i, a in enumerate(self.experts)]
        refs += [w.load_checkpoint.remote(d) for w in self.workers]
        refs += [w.set_placement.remote(placement.to_dict()) for w in self.workers]
        _get(refs, CONTROL_TIMEOUT_S, "checkpoint restore")
        self.placement = placement
        self.step = m.step
        return m.step

    # ================================================================== scheduler

    def rebalance(self, decision_or_placement: Any = None) -> Any:
        """Between steps: decide from the load seen so far (None) or apply a PlacementDecision / Placement, moving
        expert replicas with their AdamW state (scheduler/migrate.py). Returns the MigrationReport, or None when
        the placement does not change."""
        return self.scheduler.rebalance(self, decision_or_placement)

    # ================================================================== inspection

    def expert_weights(self) -> dict[str, torch.Tensor]:
        """Current expert weights stacked per layer, keyed like the in-process model's state dict
        (`expert_param_name(layer, "w1" | "w2")` -> [E, ...]), read from each expert's first replica."""
        keys = self._primary_keys()
        states = _get([a.state.remote(ks) for a, ks in zip(self.experts, keys)], CONTROL_TIMEOUT_S, "expert state")
        flat: dict[Key, dict[str, torch.Tensor]] = {}
        for s in states:
            flat.update(s)
        out = {}
        for layer in range(self.cfg.model.num_layers):
            for w in ("w1", "w2"):
                out[expert_param_name(layer, w)] = torch.stack(
                    [flat[(layer, e)][w] for e in range(self.cfg.model.num_experts)])
        return out

    def dense_state(self, worker: int = 0) -> dict[str, torch.Tensor]:
        """Dense model tensors of one router worker (state-dict keys, no optimizer state)."""
        st = _get(self.workers[worker].dense_state.remote(), CONTROL_TIMEOUT_S, "dense state")
        return {k[len("model."):]: v for k, v in st.items() if k.startswith("model.")}

    def status(self) -> dict[str, Any]:
        """Placement, nodes, per-actor load and health (an actor that does not answer is reported, not raised)."""
        import ray

        actors = []
        for i, a in enumerate(self.experts):
            try:
                s = ray.get(a.stats.remote(), timeout=10)
                tokens = ray.get(a.token_counts.remote(), timeout=10)
                actors.append({**s, "shards": [list(k) for k in s["shards"]], "tokens": sum(tokens.values()),
                               "health": "ok"})
            except ray.exceptions.RayError as err:
                actors.append({"index": i, "health": f"unreachable: {type(err).__name__}"})
        workers = []
        for i, w in enumerate(self.workers):
            try:
                workers.append({**ray.get(w.info.remote(), timeout=10), "health": "ok"})
            except ray.exceptions.RayError as err:
                workers.append({"index": i, "health": f"unreachable: {type(err).__name__}"})
        return {
            "step": self.step,
            "placement": self.placement.to_dict(),
            "nodes": self.env.node_ids(),
            "ray_mode": self.env.mode,
            "expert_actors": actors,
            "router_workers": workers,
            "recoveries": self.recoveries,
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "healthy": all(x["health"] == "ok" for x in actors + workers),
            "scheduler": self.scheduler.status(self.placement),
        }


def _step_timeout(cfg: RuntimeConfig) -> float:
    # every MoE layer does one forward and one backward exchange per micro-batch, each bounded by the deadline
    return CONTROL_TIMEOUT_S + 2 * cfg.model.num_layers * cfg.train.micro_batches * cfg.transport.deadline_s


def _get(refs: Any, timeout: float, what: str) -> Any:
    """ray.get with a bound; a timeout names what was waited for."""
    import ray

    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError as err:
        raise ray.exceptions.GetTimeoutError(f"{what}: no answer within {timeout:.0f} s") from err


__all__ = ["Cluster", "ClusterError", "ClusterStartError", "StepReport", "check_config"]
