"""Hardware tables: the numbers a cost model is built from (YAML files, see ``sim/tables/``).

Two kinds:

- ``kind: gpu`` (``h100``, ``a100``): datasheet numbers (dense bf16 FLOP/s, HBM bandwidth, NVLink and
  InfiniBand per GPU) times realistic efficiency factors (``gpu_cost.py`` turns them into a roofline).
- ``kind: host`` (written by ``calibrate.py``): this machine, measured (``host_cost.py``): every process of the
  local cluster shares ``host_cores`` CPU cores; link ``alpha_s`` is the part of an RPC that waits without using
  a core, ``cpu_s`` the part that does.

Links are alpha-beta per class: ``loopback`` (same device / same host), ``intra_node`` (NVLink), ``inter_node``
(InfiniBand); ``bandwidth`` is bytes/s per direction per port (one port per GPU per class), times
``efficiency``. A host table needs only ``loopback``: one host, every transfer is loopback.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

__all__ = [
    "LINK_CLASSES",
    "CostModelError",
    "HardwareTable",
    "Link",
    "load_table",
    "scale_host_roles",
    "scale_host_table",
    "table_names",
]

LINK_CLASSES = ("loopback", "intra_node", "inter_node")
TABLE_DIR = Path(__file__).parent / "tables"


class CostModelError(ValueError):
    """A hardware table (or the measured part of one) that a cost model cannot be built from."""


@dataclass(frozen=True)
class Link:
    alpha_s: float  # latency per message; does not occupy the port (or a core)
    bandwidth: float  # bytes/s per direction per port, already times efficiency
    cpu_s: float = 0.0  # host tables: CPU time per message (occupies a core of the shared pool)

    def time(self, nbytes: float) -> float:
        """alpha + bytes / beta: one message alone on the link."""
        return self.alpha_s + self.cpu_s + nbytes / self.bandwidth


def number(d: dict, key: str, where: str, default: float | None = None) -> float:
    """``d[key]`` as a finite number >= 0 (`default` when absent; required when `default` is None)."""
    if key not in d:
        if default is None:
            raise CostModelError(f"{where}.{key}: required field is missing")
        return float(default)
    try:
        v = float(d[key])
    except (TypeError, ValueError):
        raise CostModelError(f"{where}.{key} = {d[key]!r}: expected a number") from None
    if not np.isfinite(v) or v < 0:
        raise CostModelError(f"{where}.{key} = {v}: must be a finite number >= 0")
    return v


@dataclass(frozen=True)
class HardwareTable:
    """A parsed table. GPU fields are used when kind == "gpu"; `measured` when kind == "host"."""

    name: str
    kind: Literal["gpu", "host"]
    links: dict[str, Link]
    host_cores: float = 0.0  # host tables: CPU capacity shared by every process (may be fractional)
    # host tables: every cost x this (measured against the real local cluster: its processes' CPU seconds per
    # step / the table's CPU work for the same routing; runtime.calibrate_cluster.measure_cluster_cpu_scale)
    cpu_scale: float = 1.0
    # gpu
    peak_flops: float = 0.0
    mfu_dense: float = 0.0
    mfu_expert: float = 0.0
    hbm_bandwidth: float = 0.0
    param_bytes: float = 2.0  # bf16 weights
    kernel_overhead_s: float = 0.0
    layer_overhead_s: float = 0.0
    rpc_overhead_s: float = 0.0
    codec_fixed_s: float = 0.0
    codec_s_per_byte: float = 0.0
    backward_factor: float = 2.0
    grad_bytes_per_param: float = 2.0
    optimizer_bytes_per_param: float = 30.0
    step_overhead_s: float = 0.0
    # host
    measured: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> HardwareTable:
        if not isinstance(d, dict):
            raise CostModelError(f"{source}: a hardware table must be a mapping")
        kind = d.get("kind")
        if kind not in ("gpu", "host"):
            raise CostModelError(f"{source}: kind = {kind!r}: expected 'gpu' or 'host'")
        links_raw = d.get("links") or {}
        links = {}
        for cls_name in LINK_CLASSES:
            if cls_name not in links_raw:
                if kind == "host" and cls_name != "loopback":
                    continue
                raise CostModelError(f"{source}: links.{cls_name}: required for kind {kind}")
            raw = links_raw[cls_name]
            where = f"{source}: links.{cls_name}"
            bw = number(raw, "bandwidth", where) * number(raw, "efficiency", where, 1.0)
            if bw <= 0:
                raise CostModelError(f"{where}.bandwidth: must be > 0")
            links[cls_name] = Link(number(raw, "alpha_s", where), bw, number(raw, "cpu_s", where, 0.0))
        if kind == "host":  # one host: every transfer is loopback
            for cls_name in LINK_CLASSES:
                links.setdefault(cls_name, links["loopback"])
            cores = float(d.get("host_cores", 0))
            if not cores > 0:
                raise CostModelError(f"{source}: host_cores = {cores}: must be > 0")
            cpu_scale = number(d, "cpu_scale", source, 1.0)
            if not cpu_scale > 0:
                raise CostModelError(f"{source}: cpu_scale = {cpu_scale}: must be > 0")
            measured = d.get("measured")
            for part in ("expert", "dense", "head", "optimizer", "codec"):
                if not isinstance(measured, dict) or part not in measured:
                    raise CostModelError(f"{source}: measured.{part}: required for kind host")
            return cls(
                name=str(d.get("name", "host")), kind="host", links=links, host_cores=cores, cpu_scale=cpu_scale,
                step_overhead_s=number(d, "step_overhead_s", source, 0.0),
                grad_bytes_per_param=number(d, "grad_bytes_per_param", source, 4.0),
                measured=measured, source=source,
            )  # fmt: skip
        g = {k: number(d, k, source) for k in ("peak_flops", "mfu_dense", "mfu_expert", "hbm_bandwidth")}
        if not all(g.values()):
            raise CostModelError(f"{source}: peak_flops, mfu_dense, mfu_expert, hbm_bandwidth must be > 0")
        return cls(
            name=str(d.get("name", "gpu")), kind="gpu", links=links, **g,
            param_bytes=number(d, "param_bytes", source, 2.0),
            kernel_overhead_s=number(d, "kernel_overhead_s", source, 0.0),
            layer_overhead_s=number(d, "layer_overhead_s", source, 0.0),
            rpc_overhead_s=number(d, "rpc_overhead_s", source, 0.0),
            codec_fixed_s=number(d, "codec_fixed_s", source, 0.0),
            codec_s_per_byte=number(d, "codec_s_per_byte", source, 0.0),
            backward_factor=number(d, "backward_factor", source, 2.0),
            grad_bytes_per_param=number(d, "grad_bytes_per_param", source, 2.0),
            optimizer_bytes_per_param=number(d, "optimizer_bytes_per_param", source, 30.0),
            step_overhead_s=number(d, "step_overhead_s", source, 0.0),
            source=source,
        )  # fmt: skip

    def with_links(self, **links: Link) -> HardwareTable:
        """A copy with some link classes replaced (what-if studies, tests)."""
        return replace(self, links={**self.links, **links})


def scale_host_table(table: HardwareTable, stretch: float) -> HardwareTable:
    """The table for a machine where every process runs `stretch` times slower: every time x stretch, every
    bandwidth / stretch (the table's own ``cpu_scale`` is kept: the host cost model applies it on top)."""
    return scale_host_roles(table, stretch, stretch, stretch)


def scale_host_roles(table: HardwareTable, expert: float, dense: float, rest: float) -> HardwareTable:
    """`scale_host_table` per role: the experts' compute x `expert`, the router workers' dense layers and head x
    `dense`, everything else (messages: RPC, codec, links; optimizer; all-reduce) x `rest`."""
    if table.kind != "host":
        raise ValueError(f"scale_host_table: {table.name} is a {table.kind} table")
    for name, f in (("expert", expert), ("dense", dense), ("rest", rest)):
        if not f > 0:
            raise ValueError(f"{name} scale = {f}: must be > 0")
    m = {k: (dict(v) if isinstance(v, dict) else v) for k, v in table.measured.items()}
    for part, keys, f in (("expert", ("fixed_s", "s_per_row", "bwd_fixed_s", "bwd_s_per_row"), expert),
                          ("dense", ("fixed_s", "s_per_token"), dense), ("head", ("fixed_s", "s_per_token"), dense),
                          ("optimizer", ("s_per_param",), rest), ("codec", ("fixed_s", "s_per_byte"), rest),
                          ("allreduce", ("alpha_s",), rest)):  # fmt: skip
        for k in keys:
            if part in m and k in m[part]:
                m[part][k] = m[part][k] * f
        for k in ("times_s", "bwd_times_s"):  # the measured points the cost model interpolates
            if part in m and k in m[part]:
                m[part][k] = [t * f for t in m[part][k]]
    if "allreduce" in m and "bandwidth" in m["allreduce"]:
        m["allreduce"]["bandwidth"] = m["allreduce"]["bandwidth"] / rest
    links = {c: Link(lk.alpha_s * rest, lk.bandwidth / rest, lk.cpu_s * rest) for c, lk in table.links.items()}
    return replace(table, links=links, measured=m)


def table_names() -> list[str]:
    return sorted(p.stem for p in TABLE_DIR.glob("*.yaml"))


def load_table(name_or_path: str | Path) -> HardwareTable:
    """A table by name (``h100``, ``a100``; files in sim/tables/) or a path to a YAML file."""
    p = Path(name_or_path)
    if not p.suffix:
        cand = TABLE_DIR / f"{name_or_path}.yaml"
        if not cand.exists():
            raise CostModelError(f"hardware = {str(name_or_path)!r}: no table; expected one of {table_names()} "
                                 "or a path to a YAML file")  # fmt: skip
        p = cand
    if not p.exists():
        raise CostModelError(f"hardware table {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise CostModelError(f"{p}: not valid YAML: {err}") from None
    return HardwareTable.from_dict(data, source=str(p))
