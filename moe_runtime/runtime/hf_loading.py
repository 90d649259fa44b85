"""An HF-layout Yuan checkpoint onto the cluster and back, streamed: no party holds more than it hosts.

Load (`model.checkpoint`): the driver opens the checkpoint (HFCheckpoint: config.json and every shard header are
validated before Ray starts, see launch.py) and ships that validated, picklable object to every party. Each expert
actor reads only the (layer, expert) tensors it hosts, straight from the shard files, one expert at a time, in
chunks of one layer (a chunk per call so the driver can show progress); each router worker reads only the dense
tensors. The driver reads no tensor at all.

Export (`Cluster.save_hf`): the driver plans the shards (hf_writer.plan_shards: every name, shape and offset follows
from the config) and creates the files at their final size; each expert actor writes its primary shards at their
offsets, router worker 0 writes the dense tensors, then the driver checks that every tensor came and writes the
index and config.json (the commit point). The directory must be reachable by every party (local mode: it is; a
multi-machine cluster needs shared storage).

Memory is measured where it is spent: every load or write call reports its process's RSS before and its peak
during the call (VmHWM, reset through /proc/self/clear_refs where the kernel allows, else ru_maxrss, which can only
overstate the peak).
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_runtime.checkpoint.hf_config import (
    CheckpointError,
    SpecialTokens,
    hf_config_from_model,
)
from moe_runtime.checkpoint.hf_reader import HFCheckpoint
from moe_runtime.checkpoint.hf_writer import (
    _TORCH_DTYPE_NAMES,
    DEFAULT_MAX_SHARD_BYTES,
    ShardPlan,
    copy_side_files,
    create_shard_files,
    dense_hf_tensors,
    expert_hf_tensors,
    finish,
    plan_shards,
    write_planned,
)
from moe_runtime.checkpoint.in_process import load_state
from moe_runtime.checkpoint.run_config import run_overrides
from moe_runtime.config import ModelConfig, RuntimeConfig
from moe_runtime.data import EOS, PAD
from moe_runtime.placement import Placement, ShardKey

log = logging.getLogger(__name__)

# The presets' byte-level vocabulary has no separator: EOS ends a document (data.py).
BYTE_LEVEL_TOKENS = SpecialTokens(eod=EOS, sep=EOS, pad=PAD)


# ----------------------------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) so the next `peak_rss` covers only what follows; False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak RSS since the last reset (VmHWM), or since the process started (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _give_back_freed() -> None:
    """malloc_trim(0): return freed heap pages to the OS (glibc; a no-op elsewhere). The data-plane processes keep
    freed buffers on purpose (malloc.tune_malloc); a load's read buffers are used once."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None)
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC: Any = None


@dataclass(frozen=True)
class MemoryWindow:
    """RSS of one process around one call: before it, the peak during it (bytes), and whether the peak was reset."""

    rss_before: int
    peak: int
    exact: bool

    @property
    def peak_delta(self) -> int:
        return max(0, self.peak - self.rss_before)


class _Watch:
    def __enter__(self) -> _Watch:
        self.exact = reset_peak_rss()
        self.before = current_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        self.window = MemoryWindow(self.before, max(peak_rss(), current_rss()), self.exact)


# ----------------------------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class PartyLoad:
    """What one call of one party read or wrote."""

    party: str  # "actor 0", "worker 1"
    pid: int
    keys: tuple[ShardKey, ...]  # (layer, expert) pairs; () for a router worker
    tensors: int
    disk_bytes: int  # bytes of the HF tensors on disk
    held_bytes: int  # bytes of these tensors as the party keeps them (weights in their storage dtype)
    seconds: float
    memory: MemoryWindow


@dataclass
class LoadReport:
    """The whole load (or export): per party, summed over its calls; the driver's own memory window."""

    directory: str
    parties: dict[str, list[PartyLoad]] = field(default_factory=dict)
    driver: MemoryWindow | None = None
    seconds: float = 0.0
    largest_tensor_bytes: int = 0
    checkpoint_summary: str = ""

    def add(self, item: PartyLoad) -> None:
        self.parties.setdefault(item.party, []).append(item)

    def totals(self) -> dict[str, dict[str, Any]]:
        """party -> {keys, tensors, disk_bytes, held_bytes, seconds, peak_delta} (peak_delta: the largest over its
        calls, measured from the RSS before its first call)."""
        out = {}
        for party, items in self.parties.items():
            base = items[0].memory.rss_before
            out[party] = {
                "pid": items[0].pid,
                "keys": sorted({k for it in items for k in it.keys}),
                "tensors": sum(it.tensors for it in items),
                "disk_bytes": sum(it.disk_bytes for it in items),
                "held_bytes": sum(it.held_bytes for it in items),
                "seconds": sum(it.seconds for it in items),
                "peak_delta": max(max(0, it.memory.peak - base) for it in items),
                "exact_peak": all(it.memory.exact for it in items),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        totals = self.totals()
        for t in totals.values():
            t["keys"] = [list(k) for k in t["keys"]]
        return {"directory": self.directory, "seconds": self.seconds, "largest_tensor_bytes": self.largest_tensor_bytes,
                "driver_peak_delta": self.driver.peak_delta if self.driver else None, "parties": totals}

    def describe(self) -> str:
        """What went where, one line per party."""
        lines = [self.checkpoint_summary] if self.checkpoint_summary else []
        for party, t in self.totals().items():
            layers = sorted({k[0] for k in t["keys"]})
            what = (f"{len(t['keys'])} experts of layers {_ranges(layers)}" if t["keys"] else "dense tensors")
            lines.append(f"  {party} (pid {t['pid']}): {what}, {t['tensors']} tensors, "
                         f"{t['disk_bytes'] / 2**20:,.1f} MiB on disk, {t['held_bytes'] / 2**20:,.1f} MiB held, "
                         f"peak +{t['peak_delta'] / 2**20:,.1f} MiB, {t['seconds']:.2f} s")
        if self.driver is not None:
            lines.append(f"  driver: peak +{self.driver.peak_delta / 2**20:,.1f} MiB (largest tensor "
                         f"{self.largest_tensor_bytes / 2**20:,.1f} MiB), {self.seconds:.2f} s in all")
        return "\n".join(lines)


def _ranges(values: Sequence[int]) -> str:
    if not values:
        return "-"
    parts, start, prev = [], values[0], values[0]
    for v in list(values[1:]) + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(parts)


# ----------------------------------------------------------------------------------------------- the checkpoint


def open_checkpoint(model: ModelConfig) -> HFCheckpoint | None:
    """The validated checkpoint of model.checkpoint (config.json and every header: CheckpointError naming the file
    and the tensor otherwise), read as fp32; None without one. Its model must be `model` (architecture and run
    fields), which the config resolution (checkpoint/run_config.py) guarantees."""
    if model.checkpoint is None:
        return None
    ckpt = HFCheckpoint(model.checkpoint, dtype=torch.float32, strict=True, **run_overrides(model))
    mine = model.model_dump(exclude={"checkpoint", "preset"})
    theirs = ckpt.config.model_dump(exclude={"checkpoint", "preset"})
    diff = sorted(k for k in mine if mine[k] != theirs[k])
    if diff:
        k = diff[0]
        raise CheckpointError(f"model.{k} = {mine[k]!r} but the checkpoint {model.checkpoint} gives {theirs[k]!r} "
                              "(resolve the config with checkpoint/run_config.load_run_config)")
    return ckpt


# ----------------------------------------------------------------------------------------------- party side


def read_experts_into(shards: Any, ckpt: HFCheckpoint, keys: Iterable[ShardKey], party: str,
                      replace: bool) -> PartyLoad:
    """An expert actor's part of a load: its (layer, expert) pairs straight from the shard files into `shards`
    (ExpertShards), one expert at a time (each is copied once into the shard's own fp32 tensor, then dropped)."""
    keys = [(int(a), int(b)) for a, b in keys]
    t0 = time.perf_counter()
    with _Watch() as w:
        if replace:
            shards.load({}, replace=True)
        for key, w1, w2 in ckpt.iter_experts(keys):
            shards.load({key: (w1, w2)})
            del w1, w2
            _give_back_freed()  # the read buffers: else the actors' raised trim threshold keeps them resident
    held = sum(a.nbytes + b.nbytes for k, (a, b) in shards.weights().items() if k in set(keys))
    return PartyLoad(party, os.getpid(), tuple(sorted(keys)), 2 * len(keys), ckpt.expert_nbytes(keys), held,
                     time.perf_counter() - t0, w.window)


def read_dense_into(model: torch.nn.Module, ckpt: HFCheckpoint, party: str) -> PartyLoad:
    """A router worker's part: every dense tensor into its model, one at a time (load_state skips the experts of
    a model whose MoE layers dispatch remotely)."""
    t0 = time.perf_counter()
    with _Watch() as w:
        nbytes = load_state(model, ckpt)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    n = sum(len(r.hf_names) for r in _dense_rules(ckpt.config))
    return PartyLoad(party, os.getpid(), (), n, nbytes, held, time.perf_counter() - t0, w.window)


def _dense_rules(cfg: ModelConfig) -> list[Any]:
    from moe_runtime.checkpoint.hf_layout import dense_rules

    return dense_rules(cfg)


def write_experts(weights: Mapping[ShardKey, tuple[torch.Tensor, torch.Tensor]], cfg: ModelConfig, directory: str,
                  plan: ShardPlan, keys: Iterable[ShardKey], party: str) -> tuple[PartyLoad, list[str]]:
    """An expert actor's part of an export: its shards (w1 [d, 2f], w2 [f, d]) at their planned offsets."""
    keys = sorted((int(a), int(b)) for a, b in keys)
    t0 = time.perf_counter()
    names, nbytes = [], 0
    with _Watch() as w:
        for key in keys:
            if key not in weights:
                raise KeyError(f"{party}: export asks for shard {key}, which it does not host")
            for name, t in expert_hf_tensors(cfg, key[0], key[1], *weights[key]):
                nbytes += write_planned(directory, plan, name, t)
                names.append(name)
            _give_back_freed()
    held = sum(weights[k][0].nbytes + weights[k][1].nbytes for k in keys)
    return PartyLoad(party, os.getpid(), tuple(keys), len(names), nbytes, held, time.perf_counter() - t0,
                     w.window), names


def write_dense(model: torch.nn.Module, cfg: ModelConfig, directory: str, plan: ShardPlan,
                party: str) -> tuple[PartyLoad, list[str]]:
    """Router worker 0's part of an export: every dense tensor at its planned offset."""
    params = dict(model.named_parameters())
    t0 = time.perf_counter()
    names, nbytes = [], 0
    with _Watch() as w:
        for rule in _dense_rules(cfg):
            for name, t in dense_hf_tensors(cfg, rule.param, params[rule.param].detach()):
                nbytes += write_planned(directory, plan, name, t)
                names.append(name)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    return PartyLoad(party, os.getpid(), (), len(names), nbytes, held, time.perf_counter() - t0, w.window), names


# ----------------------------------------------------------------------------------------------- driver side

Progress = Callable[[str, int, int], None]  # (party, bytes done, bytes total of that party)


def _rich_progress() -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=Console(stderr=True))


def _track(refs: dict[Any, tuple[str, int]], totals: dict[str, int], verb: str, timeout_s: float) -> list[Any]:
    """ray.wait over the calls, one progress bar per party (bytes done of its total); results in call order."""
    import ray

    order = list(refs)
    done: dict[Any, Any] = {}
    with _rich_progress() as bar:
        tasks = {p: bar.add_task(f"{verb} {p}", total=max(n, 1), info="") for p, n in totals.items()}
        calls = {p: 0 for p in totals}
        ncalls = {p: sum(1 for q, _ in refs.values() if q == p) for p in totals}
        pending = list(order)
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{verb}: {len(pending)} call(s) not done after {timeout_s:.0f} s")
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            for r in ready:
                done[r] = ray.get(r)
                party, nbytes = refs[r]
                calls[party] += 1
                bar.update(tasks[party], advance=nbytes, info=f"{calls[party]}/{ncalls[party]} chunk(s)")
    return [done[r] for r in order]


def load_cluster(ckpt: HFCheckpoint, experts: Sequence[Any], workers: Sequence[Any], placement: Placement,
                 timeout_s: float) -> LoadReport:
    """Every party reads its own part of `ckpt`: actors their placement's shards (one call per layer, the first
    replacing what they hosted), workers the dense tensors. Returns what went where."""
    import ray

    t0 = time.perf_counter()
    report = LoadReport(str(ckpt.directory), largest_tensor_bytes=ckpt.largest_tensor_nbytes,
                        checkpoint_summary=ckpt.summary.describe())
    with _Watch() as w:
        ref = ray.put(ckpt)  # headers only: a few KB per tensor name
        refs: dict[Any, tuple[str, int]] = {}
        totals: dict[str, int] = {}
        for i, actor in enumerate(experts):
            party = f"actor {i}"
            by_layer: dict[int, list[ShardKey]] = {}
            for key in placement.shards_of(i):
                by_layer.setdefault(key[0], []).append(key)
            chunks = [by_layer[layer] for layer in sorted(by_layer)] or [[]]
            totals[party] = ckpt.expert_nbytes(placement.shards_of(i))
            for n, keys in enumerate(chunks):
                r = actor.load_hf.remote(ref, keys, placement.version, n == 0, party)
                refs[r] = (party, ckpt.expert_nbytes(keys))
        for i, worker in enumerate(workers):
            party = f"worker {i}"
            totals[party] = ckpt.dense_nbytes()
            refs[worker.load_hf.remote(ref, party)] = (party, totals[party])
        for item in _track(refs, totals, "loading", timeout_s):
            report.add(item)
    report.driver = w.window
    report.seconds = time.perf_counter() - t0
    _console().print(report.describe(), markup=False, highlight=False)
    return report


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def export_dtype(ckpt_dtypes: Mapping[str, int] | None) -> torch.dtype:
    """The dtype an export writes by default: the imported checkpoint's when it had one, else bf16."""
    if ckpt_dtypes and len(ckpt_dtypes) == 1:
        name = next(iter(ckpt_dtypes))
        dtype = getattr(torch, name, None)
        if dtype in _TORCH_DTYPE_NAMES:
            return dtype
    return torch.bfloat16


def save_cluster(cfg: RuntimeConfig, experts: Sequence[Any], workers: Sequence[Any], placement: Placement,
                 directory: str | Path, *, dtype: torch.dtype | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, timeout_s: float = 600.0) -> LoadReport:
    """Export the cluster's current weights in the HF layout, streamed from the parties (see the module doc)."""
    directory = Path(directory).resolve()
    base, tokens, dtypes = None, None, None
    if cfg.model.checkpoint is not None:
        source = HFCheckpoint(cfg.model.checkpoint, **run_overrides(cfg.model))
        base, dtypes = source.info.raw, source.summary.dtypes
    else:
        tokens = BYTE_LEVEL_TOKENS
    dtype = dtype or export_dtype(dtypes)
    t0 = time.perf_counter()
    report = LoadReport(str(directory))
    with _Watch() as w:
        plan = plan_shards(cfg.model, dtype, max_shard_bytes)
        config_json = hf_config_from_model(cfg.model, base, tokens, torch_dtype=_TORCH_DTYPE_NAMES[dtype])
        create_shard_files(directory, plan)
        report.largest_tensor_bytes = max(t.nbytes for t in plan.tensors.values())
        import ray

        ref = ray.put(plan)
        refs: dict[Any, tuple[str, int]] = {}
        totals: dict[str, int] = {}
        for i, (actor, keys) in enumerate(zip(experts, placement.primary_shards())):
            if keys:
                party = f"actor {i}"
                totals[party] = sum(plan.tensors[n].nbytes for k in keys for n in _expert_names(k))
                refs[actor.write_hf.remote(str(directory), ref, list(keys), party)] = (party, totals[party])
        dense = sum(plan.tensors[n].nbytes for r in _dense_rules(cfg.model) for n in r.hf_names)
        refs[workers[0].write_hf.remote(str(directory), ref, "worker 0")] = ("worker 0", dense)
        totals["worker 0"] = dense
        written: list[str] = []
        for item, names in _track(refs, totals, "exporting", timeout_s):
            report.add(item)
            written += names
        missing = sorted(set(plan.tensors) - set(written))
        twice = len(written) - len(set(written))
        if missing or twice:
            raise CheckpointError(f"{directory}: export incomplete: {len(missing)} tensor(s) never written "
                                  f"(e.g. {missing[:3]}), {twice} written twice")
        finish(directory, plan, config_json)
        if cfg.model.checkpoint is not None:
            copy_side_files(cfg.model.checkpoint, directory)
    report.driver = w.window
    report.seconds = time.perf_counter() - t0
    return report


def _expert_names(key: ShardKey) -> tuple[str, str]:
    from moe_runtime.checkpoint.hf_layout import hf_expert_names

    return hf_expert_names(*key)


__all__ = ["BYTE_LEVEL_TOKENS", "LoadReport", "MemoryWindow", "PartyLoad", "export_dtype", "load_cluster",
           "open_checkpoint", "read_dense_into", "read_experts_into", "run_overrides", "save_cluster",
           "write_dense", "write_experts"]
