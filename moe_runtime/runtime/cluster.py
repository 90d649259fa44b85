"""Cluster: the one public entry point for running the MoE model on Ray, a facade over launch (launch.py), the
training step (step.py) and recovery (recovery.py).

    with Cluster.start(load_config("cluster/local.yaml")) as c:
        result = c.train(50)              # TrainResult, same JSON as InProcessTrainer.run plus placement / load
        logits = c.forward(tokens)        # [B, S, V]
        c.checkpoint("runs/ckpt"); c.restore("runs/ckpt")
        print(c.status())

Parties: expert actors (ExpertActor, in a placement group, one bundle each) and router workers (RouterWorker, data
parallel). The driver (this process) runs the control plane only.

Failures (what is survived): see recovery.py. When a step fails before any party stepped its optimizer and every
expert of a lost actor has a live replica, `train` copies the lost state from the replicas and re-runs only that
step (replica_recovery.py); otherwise it rolls every party back to the last automatic checkpoint
(train.checkpoint_every; a step-0 checkpoint is written when training starts) and re-runs the steps since; because
a step is a pure function of (state, step), the final losses equal a run without the fault either way. Serving:
`forward` routes around dead actors to live replicas and restarted actors rejoin by themselves (failover.py).
A party that hangs is killed after cluster.hang_timeout_s and recovered like a dead one (in a training step: a
router worker not done within hang_timeout_s of its peer, runtime/hangs.py). A dead or hung router worker's rows
of a forward go to a live worker, and a restarted worker gets a survivor's dense state; a node lost with parties
the nodes left cannot host is a NodeLossError naming them (runtime/nodes.py). A save interrupted
half-way leaves the previous checkpoint as the one LATEST points to (checkpoint/training_state.py).
What is not survived: death of the driver (restart it and `restore` the last checkpoint), loss of the checkpoint
storage, more failures than max_restarts per actor, a failure with checkpoint_every = 0 (nothing to roll back to:
the error is raised), and deterministic errors (after `max_recoveries` attempts without progress the original
error is raised).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moe_runtime.config import ModelConfig, RuntimeConfig, load_config
from moe_runtime.data import val_batches
from moe_runtime.data_files import DocumentBatch, load_training_corpus
from moe_runtime.model.transformer import expert_param_name
from moe_runtime.placement import Placement, ShardKey, split_over_replicas
from moe_runtime.records import TimingMeans
from moe_runtime.checkpoint import training_state as ckpt
from moe_runtime.runtime.calls import COLLECTIVE_TIMEOUT_S, CONTROL_TIMEOUT_S, START_TIMEOUT_S, get_within
from moe_runtime.runtime import cluster_mask, failover, hung_parties, nodes, party_pool, relaunch
from moe_runtime.runtime import scale as scaling
from moe_runtime.runtime.failover import HealReport
from moe_runtime.runtime.fleet import RayExpertFleet
from moe_runtime.runtime.launch import Launched, check_config, launch, release
from moe_runtime.runtime.ray_env import ClusterStartError
from moe_runtime.runtime.party_names import names
from moe_runtime.runtime.recovery import ClusterError, is_fault, wait_alive
from moe_runtime.runtime.replica_recovery import rerun_without_rollback
from moe_runtime.runtime.step import StepReport, run_train_step
from moe_runtime.runtime.status_load import load_tables
from moe_runtime.runtime.metrics import metrics_for, prometheus_url, record_metrics
from moe_runtime.runtime.step_log import step_record
from moe_runtime.scheduler.hook import SchedulerHook
from moe_runtime.scheduler.migrate import MigrationError, MigrationReport
from moe_runtime.scheduler.types import PlacementDecision
from moe_runtime.training import ProgressFn, TrainResult
from moe_runtime.model.weight_storage import check_trainable

log = logging.getLogger(__name__)


class Cluster:
    def __init__(self, cfg: RuntimeConfig, launched: Launched):
        self.cfg = cfg
        self._launched = launched
        self.env = launched.env
        self.experts: list[Any] = launched.experts  # ExpertActor handles (Ray), index = actor index
        self.workers: list[Any] = launched.workers  # RouterWorker handles (Ray)
        self.fleet = RayExpertFleet(self.experts, self.workers, launched.placement,
                                    timeout_s=cfg.cluster.hang_timeout_s)  # holds the placement
        self.actor_infos = launched.infos
        self.worker_pids: list[int] = get_within([w.ping.remote() for w in self.workers], START_TIMEOUT_S,
                                                 "router worker pids")  # to kill one that hangs
        self.worker_nodes: list[str] = nodes.worker_node_ids(self.workers, START_TIMEOUT_S)  # to name node losses
        self.lost_workers: dict[int, str] = {}  # dead or hung router workers forwards avoid until a heal (nodes.py)
        self._hung: dict[str, int | None] = {}  # party -> its pid when a deadline caught it (hung_parties.py)
        self._token = launched.token
        self.step = 0  # optimizer steps taken = the next step to run
        self.recoveries = 0
        self.last_checkpoint: Path | None = None
        self._closed = False
        self._corpus = None
        self.scheduler = SchedulerHook(cfg)  # load tracking + rebalancing (scheduler.enabled)
        self._heal_lock = threading.RLock()
        self._healer: Any = None  # a background heal thread (forward found actors down)
        self.last_heal: failover.HealReport | None = None
        self.last_heal_error: str | None = None
        self.last_degraded: list[list[int]] = []  # (layer, expert) masked in the last forward / generate (mask mode)
        self.steps_rerun = 0  # failed steps re-run from live replicas, without a rollback (replica_recovery.py)
        self.hf_load = launched.hf_load  # hf_loading.LoadReport: what went where, when model.checkpoint was loaded

    @property
    def placement(self) -> Placement:
        """The placement every party runs under (the fleet's; migration and restore change it)."""
        return self.fleet.placement

    @placement.setter
    def placement(self, placement: Placement) -> None:
        self.fleet.placement = placement

    # ================================================================== start / stop

    @classmethod
    def start(cls, config: RuntimeConfig | str | Path) -> Cluster:
        """Start (or join) Ray, place and start every actor, load the oracle's initial weights."""
        cfg = config if isinstance(config, RuntimeConfig) else load_config(config)
        reused = party_pool.take(cfg)  # inside party_pool.keep_parties(): a parked cluster's processes, same layout
        return cls._owning(cfg, reused if reused is not None else launch(cfg))

    @classmethod
    def _owning(cls, cfg: RuntimeConfig, launched: Launched) -> Cluster:
        """The cluster over `launched` parties, its collective group up; the parties are released if that fails."""
        cluster = cls(cfg, launched)
        try:
            cluster._init_collective()
        except BaseException:
            release(launched, wait_free=False)
            raise
        return cluster

    def _init_collective(self) -> None:
        if len(self.workers) > 1 and self.cfg.cluster.grad_sync == "gloo":
            init_method = get_within(self.workers[0].rendezvous.remote(), CONTROL_TIMEOUT_S, "gloo rendezvous")
            # a peer stopped mid-all-reduce: the others fail after half the hang timeout, the ping then names and
            # kills the stopped one, all within 2 x hang_timeout_s (the survivors' single thread is in the all-reduce)
            op_timeout_s = min(COLLECTIVE_TIMEOUT_S, self.cfg.cluster.hang_timeout_s / 2)
            get_within([w.init_collective.remote(init_method, COLLECTIVE_TIMEOUT_S, op_timeout_s)
                        for w in self.workers], CONTROL_TIMEOUT_S, "gloo group")  # fmt: skip

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        healing = self._healer is not None and self._healer.is_alive()  # a heal in flight: parties not settled
        if not healing and getattr(self, "_bundles", None) is None and party_pool.park(self._launched, self.cfg):
            return  # kept for the next start of this layout (party_pool.keep_parties)
        relaunch.forget(self._launched)
        release(self._launched)  # every actor, scaled-up ones too (the experts list is shared)
        scaling.release_scaled_groups(self)

    def restart(self, config: RuntimeConfig | str | Path) -> Cluster:
        """A fresh cluster for `config` on this cluster's processes (runtime/relaunch.py): what `Cluster.start`
        returns (the oracle's initial weights, step 0), ~0.1 instead of ~1.6-2.5 CPU-s per party. The layout
        (relaunch.LAYOUT_FIELDS: expert actors, resources) must be the same, else ClusterStartError and this
        cluster is untouched; cluster.router_workers may differ (workers started or killed). After that this
        object is closed and the returned one owns the processes and Ray."""
        cfg = config if isinstance(config, RuntimeConfig) else load_config(config)
        if self._closed:
            raise ClusterStartError("restart: this cluster is shut down")
        if getattr(self, "_bundles", None) is not None:
            raise ClusterStartError("restart: this cluster was scaled (scale.py); start a new cluster instead")
        relaunch.check_layout(self._launched, self.cfg, cfg)  # nothing touched yet: this cluster stays usable
        if self._healer is not None:
            self._healer.join()  # a background heal must not touch the parties while they re-initialise
        self._closed = True  # from here the processes and Ray belong to the new cluster (or are released)
        return type(self)._owning(cfg, relaunch.relaunch(self._launched, self.cfg, cfg))

    def __enter__(self) -> Cluster:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ================================================================== inference

    def forward(self, tokens: torch.Tensor, docs: DocumentBatch | None = None) -> torch.Tensor:
        """Logits [B, S, V] for tokens [B, S]; rows are split over the router workers. `docs`: packed documents
        of the rows (data_files.py). With transport.on_expert_failure = mask, experts with no live replica are
        routed around (runtime/expert_mask.py) and `last_degraded` lists them as [layer, expert] pairs."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens has shape {list(tokens.shape)}: expected [batch, seq]")
        parts = torch.tensor_split(tokens, min(len(self.workers), tokens.shape[0]))
        bounds = torch.tensor([0, *(len(p) for p in parts)]).cumsum(0).tolist()
        part_docs = [None if docs is None else docs.rows(slice(lo, hi)) for lo, hi in zip(bounds, bounds[1:])]

        def run(indices: list[int], down: dict[int, str]) -> list[dict]:  # the parts `indices`, under mask `down`
            return nodes.on_live_workers(self.workers, indices, lambda w, i: w.forward_agreed.remote(
                parts[i], self.step, part_docs[i], down), self.fleet.timeout_s, self.lost_workers)

        try:  # every part under one mask: a part that met an expert outside it re-runs (runtime/cluster_mask.py)
            out = cluster_mask.forward_under_one_mask(run, len(parts), self.placement,
                                                      self.cfg.transport.on_expert_failure == "mask")
        except BaseException as err:
            if is_fault(err):  # e.g. an expert with no live replica (on_expert_failure = fail): rejoin, then raise
                self._note_hung(hung_parties.from_fault(err, self.actor_infos)
                                | hung_parties.from_forward({}, self.lost_workers))  # fmt: skip
                self.heal()
            raise
        self.last_degraded = out.degraded
        self._note_hung(hung_parties.from_forward(out.down, self.lost_workers))
        if out.down or self.lost_workers:
            self._heal_in_background()  # the workers already route around them; bring them back meanwhile
        return out.logits

    def heal(self) -> HealReport:
        """Bring restarted or inconsistent expert actors back into the placement (from live replicas, or the
        last checkpoint), without a manual recover(); re-wires the router workers. See runtime/failover.py."""
        with self._heal_lock:
            infos = wait_alive(self.experts, self.workers, hang_timeout_s=self.cfg.cluster.hang_timeout_s,
                               local=self.cfg.cluster.ray_address is None,
                               expert_pids=[i.pid for i in self.actor_infos], worker_pids=self.worker_pids,
                               check=lambda: nodes.check_capacity(self),  # a lost node's parties that cannot return
                               hung=self.take_hung())
            report = failover.heal(self, infos)
            nodes.repair_workers(self)  # a restarted router worker gets a survivor's dense state; new pids
            self.last_heal = report
            return report

    def _party_pids(self) -> dict[str, int | None]:
        return ({f"expert actor {i.index}": i.pid for i in self.actor_infos}
                | {f"router worker {i}": pid for i, pid in enumerate(self.worker_pids)})  # fmt: skip

    def _note_hung(self, found: set[str]) -> None:
        if not found:  # every forward calls this: nothing to look up then
            return
        pids = self._party_pids()
        self._hung.update({name: pids.get(name) for name in found})

    def take_hung(self) -> set[str]:
        """The parties a deadline caught since the last recovery (runtime/hung_parties.py) and not restarted
        since, forgotten here: the recovery that takes them gives each one short ping before killing it."""
        caught, self._hung = self._hung, {}  # a name noted in between waits for the next recovery: no harm
        return hung_parties.still_hung(caught, self._party_pids())

    def _heal_in_background(self) -> None:
        if self._healer is not None and self._healer.is_alive():
            return

        def run() -> None:
            try:
                self.heal()
            except Exception as err:  # noqa: BLE001  (reported by status(); the next forward tries again)
                log.warning("background heal failed: %s", err)
                self.last_heal_error = f"{type(err).__name__}: {err}"

        self._healer = threading.Thread(target=run, name="cluster-heal", daemon=True)
        self._healer.start()

    def prepare_training(self) -> None:
        """Have every party build its optimizer now (they do at their first step otherwise; a serving cluster never
        does), e.g. so a timed first step costs what the others do."""
        get_within([p.prepare_training.remote() for p in self.workers + self.experts], CONTROL_TIMEOUT_S,
                   "building optimizers", names(self.experts, self.workers))  # fmt: skip

    def wait_healed(self, timeout: float | None = None) -> None:
        """Wait for a background heal started by forward() (train, checkpoint and status do this first)."""
        if self._healer is not None:
            self._healer.join(timeout)

    def scale(self, expert_actors: int) -> scaling.ScaleReport:
        """Add or remove expert actors, between steps or while serving: new actors join and experts move onto
        them with their AdamW state; leaving actors are drained first (runtime/scale.py). Not enough free GPUs
        is a ClusterStartError naming what is short."""
        self.wait_healed()
        with self._heal_lock:
            return scaling.scale(self, expert_actors)

    def default_checkpoint_root(self) -> Path:
        return Path(self.cfg.train.checkpoint_dir).resolve()

    def generation_engine(self, tokenizer: Any = None, eod_id: int | None = None) -> Any:
        """A generation Engine (generation/engine.py) over router worker 0, which keeps the decoding caches
        (runtime/generation_backend.py); the run's tokenizer (the checkpoint's, else bytes) unless one is given."""
        from moe_runtime.checkpoint.text import tokenizer_for
        from moe_runtime.generation.engine import Engine

        if tokenizer is None:
            run_tok = tokenizer_for(self.cfg.model)
            tokenizer, eod_id = run_tok.tokenizer, run_tok.eod_id
        # each step says the mask it ran under (serving reports degraded answers); actors found down: heal
        backend = cluster_mask.ReportingBackend(self.workers[0], self.cfg.model, on_down=self._heal_in_background,
                                                spares=self.workers[1:])  # caches move there if worker 0 is lost
        return Engine(backend, tokenizer, eod_id)

    def generate(self, prompts: list, params: Any = None, on_event: Any = None) -> list:
        """Completions (generation/engine.py Completion) of prompts (text or token ids), all in one continuous
        batch on the cluster; params: one SamplingParams or one per prompt; on_event(TokenEvent) per token."""
        from moe_runtime.generation.engine import encode_prompts
        from moe_runtime.generation.sampling import SamplingParams

        engine = self.generation_engine()  # its steps start a heal when they find actors down
        done = engine.generate(encode_prompts(prompts, engine.tokenizer), params or SamplingParams(), on_event)
        self.last_degraded = engine.backend.take_seen()  # masked in any step of this call
        return done

    def degraded_pairs(self) -> list[list[int]]:
        """`last_degraded` as a call (the daemon's clients, session.RemoteCluster.last_degraded)."""
        return [list(p) for p in self.last_degraded]

    def evaluate(self) -> float:
        """Mean validation loss over train.val_batches fixed batches (the oracle's evaluate)."""
        t = self.cfg.train
        if self._corpus is None:
            self._corpus = load_training_corpus(self.cfg.data, self.cfg.model)
        batches = val_batches(self._corpus, t.val_batches, t.batch_size, t.seq_len)
        losses = []
        for x, y in batches:
            logits = self.forward(x, self._corpus.documents(x))
            losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).item())
        return sum(losses) / len(losses)

    # ================================================================== training

    def train_step(self, step: int | None = None) -> StepReport:
        """One optimizer step of the global batch of `step` (default: the next one). Raises on failure (no
        recovery here; `train` recovers). Timings: records.StepTimings."""
        step = self.step if step is None else step
        check_trainable(self.cfg.model)  # bf16-stored experts serve forward and generation only
        report = run_train_step(self.fleet, self.cfg, step)
        self.step = step + 1
        return report

    def train(self, steps: int | None = None, progress: ProgressFn | None = None,
              max_recoveries: int | None = None, record_trace: str | Path | None = None,
              step_log: Any = None) -> TrainResult:
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
        timing = TimingMeans()
        self.wait_healed()
        first = self.step
        failures_here = 0
        if every:
            self.checkpoint(root)
        while self.step < steps:
            step = self.step
            try:
                rep = self.train_step(step)
                self.scheduler.observe(self.fleet, step, rep.expert_load)  # may migrate experts
                if every and self.step % every == 0:
                    self.checkpoint(root)
            except BaseException as err:
                if not is_fault(err):
                    raise
                self._note_hung(hung_parties.from_fault(err, self.actor_infos))
                failures_here += 1
                if failures_here > limit:
                    raise ClusterError(f"step {step}: {failures_here} recoveries without progress; giving up") from err
                if rerun_without_rollback(self, step):  # every lost expert has a live replica: re-run this step
                    self.recoveries += 1
                    self.steps_rerun += 1
                    continue
                if not every:
                    raise
                log.warning("step %d failed (%s); rolling back to the last checkpoint", step, err)
                self._recover(root)
                continue
            failures_here = 0
            losses[step], auxes[step], times[step] = rep.loss, rep.aux, rep.timings.step_s
            loads[step] = rep.expert_load
            chunk_loads[step] = rep.worker_loads
            timing.add(rep.timings)
            if progress:
                progress(step, rep.loss)
            record = step_record(self, rep)  # loss, lr, grad norm, times, imbalance (runtime/step_log.py)
            record_metrics(self, rep, record)  # ray.util.metrics: dashboard + Prometheus (runtime/metrics.py)
            if step_log is not None:  # the terminal line and the run's JSONL
                step_log(record)
        done = sorted(s for s in losses if s >= first)
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
                "steps_rerun": self.steps_rerun,
                "mean_timings": timing.means(),
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
        t = self.cfg.train
        chunk_tokens = (t.batch_size // (len(self.workers) * t.micro_batches) * t.seq_len
                        if m.routing == "top_p" else None)  # variable copies per token: tokens given explicitly
        rec = TraceRecorder(m.num_layers, m.num_experts, m.max_copies_per_token, self.cfg.train.micro_batches,
                            meta={"source": "cluster", "preset": m.preset, "router_workers": len(self.workers),
                                  "expert_actors": len(self.experts)})  # fmt: skip
        for i, loads in enumerate(steps):
            for chunk, load_le in enumerate(loads):
                rec.record_layers(i, chunk, load_le, tokens=chunk_tokens)
        return rec.trace().save(path)

    def _actor_load(self, load: torch.Tensor) -> list[int]:
        """Token copies served per actor for an [L, E] load (the data plane's replica split)."""
        out = [0] * self.placement.num_actors
        for layer, row in enumerate(self.placement.replicas):
            for actor, _, rows in split_over_replicas(load[layer].tolist(), row):
                out[actor] += rows
        return out

    # ================================================================== faults

    def recover(self, path: str | Path | None = None) -> int:
        """After a failure outside `train` (e.g. a failed `checkpoint`): wait for every party, re-wire, and roll
        back to the last checkpoint under `path` (default train.checkpoint_dir). Returns the restored step."""
        self._recover(Path(path if path is not None else self.cfg.train.checkpoint_dir).resolve())
        return self.step

    def _recover(self, root: Path) -> None:
        """Bring every party back and roll back to the last committed checkpoint under `root`."""
        t0 = time.perf_counter()
        self.actor_infos = wait_alive(self.experts, self.workers, hang_timeout_s=self.cfg.cluster.hang_timeout_s,
                                      local=self.cfg.cluster.ray_address is None,
                                      expert_pids=[i.pid for i in self.actor_infos], worker_pids=self.worker_pids,
                                      check=lambda: nodes.check_capacity(self), hung=self.take_hung())  # fmt: skip
        self.worker_pids = get_within([w.ping.remote() for w in self.workers], CONTROL_TIMEOUT_S, "router worker pids")
        addresses = [i.address for i in self.actor_infos]
        get_within([w.set_placement.remote(self.placement.to_dict(), addresses) for w in self.workers], CONTROL_TIMEOUT_S,
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
        keys = self.placement.primary_shards()
        refs = [self.workers[0].save.remote(str(d))]
        refs += [a.save.remote(str(d), ks) for a, ks in zip(self.experts, keys) if ks]
        recs = [ckpt.FileRecord.from_dict(r) for r in get_within(
            refs, self.fleet.timeout_s, "checkpoint save",
            ["router worker 0"] + [f"expert actor {i}" for i, ks in enumerate(keys) if ks])]
        manifest = ckpt.Manifest(step=self.step, config=self.cfg.model_dump(mode="json"),
                                 placement=self.placement.to_dict(), files=recs)
        ckpt.commit(d, manifest)
        self.last_checkpoint = d
        return d

    def save_hf(self, directory: str | Path, dtype: torch.dtype | None = None,
                max_shard_bytes: int | None = None) -> dict[str, Any]:
        """Export the current weights in the HF Yuan layout (config.json, index, safetensors shards), streamed from
        the parties (runtime/hf_loading.py): dtype defaults to the imported checkpoint's, else bf16. Returns the
        report of what each party wrote (hf_loading.LoadReport.to_dict)."""
        from moe_runtime.runtime.hf_loading import DEFAULT_MAX_SHARD_BYTES, save_cluster

        report = save_cluster(self.cfg, self.experts, self.workers, self.placement, directory, dtype=dtype,
                              max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
                              timeout_s=CONTROL_TIMEOUT_S)
        log.info("exported to %s:\n%s", directory, report.describe())
        return report.to_dict()

    def restore(self, path: str | Path) -> int:
        """Load a checkpoint (root or step dir) into every party, on this cluster's actors whatever their number;
        returns the restored step (the next one to run)."""
        good = ckpt.load_latest_good(Path(path).resolve())  # past a corrupt newest one to the previous good one
        for skipped in good.skipped:
            log.warning("checkpoint skipped: %s", skipped)
        m = good.manifest
        saved_model, mine = _model_identity(m.config.get("model")), _model_identity(self.cfg.model)
        if saved_model != mine:
            raise ckpt.CheckpointError(f"checkpoint {m.directory} is for model {saved_model}, not {mine}")
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
        get_within(refs, self.fleet.timeout_s, "checkpoint restore",
                   names(self.experts) + [f"router worker {i}" for i in range(len(self.workers))] * 2)
        self.placement = placement
        self.step = m.step
        return m.step

    # ================================================================== scheduler

    def rebalance(self, decision_or_placement: PlacementDecision | Placement | None = None) -> MigrationReport | None:
        """Between steps: decide from the load seen so far (None) or apply a PlacementDecision / Placement, moving
        expert replicas with their AdamW state (scheduler/migrate.py). Returns the MigrationReport, or None when
        the placement does not change. A migration that fails is rolled back or completed (MigrationError says
        which); when an actor died in it, the cluster is brought back whole from the last checkpoint."""
        pids = [i.pid for i in self.actor_infos]
        failure: MigrationError | None = None
        try:
            report = self.scheduler.rebalance(self.fleet, decision_or_placement)
        except MigrationError as err:
            if err.consistent and not is_fault(err):
                raise
            failure = err
        # an actor that died in it is restarted empty, and Ray queues calls for it until it is back: a migration
        # can "succeed" on it. Check what every actor really is and holds before calling the migration done.
        infos = wait_alive(self.experts, self.workers, hang_timeout_s=self.cfg.cluster.hang_timeout_s,
                           local=self.cfg.cluster.ray_address is None, expert_pids=pids,
                           worker_pids=self.worker_pids)  # a restarting actor answers once it is back
        restarted = [i for i, (info, pid) in enumerate(zip(infos, pids)) if info.pid != pid]
        if failure is None and not restarted and not failover.broken_actors(infos, self.placement):
            return report
        why = str(failure) if failure is not None else f"expert actors {restarted} restarted during the migration"
        log.warning("rebalance failed (%s): healing", why)
        healed = self.heal()
        how = "rolled back to the last checkpoint" if healed.rolled_back else (
            f"repaired (actors {list(healed.broken)}) at placement version {self.placement.version}")
        raise MigrationError(f"{why}; the cluster was {how}", consistent=True,
                             version=self.placement.version) from failure

    # ================================================================== inspection

    def expert_weights(self) -> dict[str, torch.Tensor]:
        """Current expert weights stacked per layer, keyed like the in-process model's state dict
        (`expert_param_name(layer, "w1" | "w2")` -> [E, ...]), read from each expert's first replica."""
        keys = self.placement.primary_shards()
        states = get_within([a.state.remote(ks) for a, ks in zip(self.experts, keys)], CONTROL_TIMEOUT_S, "expert state")
        flat: dict[ShardKey, dict[str, torch.Tensor]] = {}
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
        st = get_within(self.workers[worker].dense_state.remote(), CONTROL_TIMEOUT_S, "dense state")
        return {k[len("model."):]: v for k, v in st.items() if k.startswith("model.")}

    def status(self) -> dict[str, Any]:
        """Placement, nodes, per-actor load and health (an actor that does not answer is reported, not raised).
        An expert actor is "ok" only when it holds exactly its shards of the placement at its version and its
        data plane answers at the address the workers use (runtime/failover.actor_status)."""
        import ray

        self.wait_healed(self.fleet.timeout_s)
        actors = failover.actor_status(self)
        workers = []
        for i, w in enumerate(self.workers):
            try:
                workers.append({**ray.get(w.info.remote(), timeout=10), "health": "ok"})
            except ray.exceptions.RayError as err:
                workers.append({"index": i, "health": f"unreachable: {type(err).__name__}"})
        return {
            "step": self.step,
            "model": self.cfg.model.model_dump(mode="json"),
            "placement": self.placement.to_dict(),
            "nodes": self.env.node_ids(),
            "ray_mode": self.env.mode,
            "expert_actors": actors,
            "router_workers": workers,
            "recoveries": self.recoveries,
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "healthy": all(x["health"] == "ok" for x in actors + workers),
            "degraded": failover.masked_now(self.workers),  # (layer, expert) the routers exclude now (mask mode)
            "last_degraded": self.last_degraded,  # masked in the last forward / generate
            "last_heal": self.last_heal.to_dict() if self.last_heal else None,
            "scheduler": self.scheduler.status(self.placement),
            "dashboard_url": self.env.dashboard_url,
            "metrics": metrics_for(self).snapshot(),  # the numbers last exported to Ray's metrics (runtime/metrics.py)
            "prometheus_url": prometheus_url(),
            **load_tables(self),  # expert_load [L][E], actor_load_per_layer [L][A], expert_map "l,e" -> actors
        }


def _model_identity(model: ModelConfig | dict | None) -> dict | None:
    """The model fields a checkpoint must agree on: all but where the weights first came from (fields added
    since a checkpoint was written take their defaults)."""
    if model is None:
        return None
    cfg = model if isinstance(model, ModelConfig) else ModelConfig.model_validate(model)
    return cfg.model_dump(mode="json", exclude={"checkpoint"})


__all__ = ["Cluster", "ClusterError", "ClusterStartError", "StepReport", "check_config"]
