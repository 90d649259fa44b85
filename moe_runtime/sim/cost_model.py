"""Cost model: how long compute, codec and transfers take, from a hardware table and a model config.

Two kinds of tables (YAML, see ``sim/tables/``):

- ``kind: gpu`` (``h100``, ``a100``): datasheet numbers (dense bf16 FLOP/s, HBM bandwidth, NVLink and
  InfiniBand per GPU) times realistic efficiency factors. Compute follows a roofline per kernel:
  ``max(FLOPs / (peak * mfu), bytes / HBM)`` plus a launch overhead. The data plane is taken to be GPU-direct
  (NVLink inside a node, GPUDirect RDMA across nodes, like NCCL / DeepEP), so codec and per-RPC costs are
  small latencies, not CPU work.
- ``kind: host`` (written by ``calibrate.py``): this machine, measured. Every process of the local cluster
  shares ``host_cores`` CPU cores, so compute, codec and RPC CPU time are work on one shared pool of cores;
  link ``alpha_s`` is the part of an RPC that waits without using a core.

``CostModel.build(table, model_cfg, seq_len, wire_bytes)`` turns a table into per-call functions for one model:
``expert_time(rows)`` (one expert on `rows` token rows, forward), ``dense_time(tokens)`` (attention + LFA +
router + norms of one layer, forward), ``head_time(tokens)`` (LM head + loss, forward), backward factors,
``message_bytes(rows)``, link classes and optimizer time per parameter.

Links are alpha-beta per class: ``loopback`` (same device / same host), ``intra_node`` (NVLink), ``inter_node``
(InfiniBand); ``bandwidth`` is bytes/s per direction per port (one port per GPU per class), times
``efficiency``. The simulator shares a port fairly between the flows that use it (simulator.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from moe_runtime.config import ModelConfig
from moe_runtime.model.accounting import count_params, flops_per_token

__all__ = [
    "LINK_CLASSES",
    "CostModel",
    "CostModelError",
    "HardwareTable",
    "Link",
    "load_table",
    "table_names",
]

LINK_CLASSES = ("loopback", "intra_node", "inter_node")
TABLE_DIR = Path(__file__).parent / "tables"
FRAME_HEADER_BYTES = 256  # codec prefix + msgpack header of a dispatch frame (a few experts), rounded up


class CostModelError(ValueError):
    pass


@dataclass(frozen=True)
class Link:
    alpha_s: float  # latency per message; does not occupy the port (or a core)
    bandwidth: float  # bytes/s per direction per port, already times efficiency
    cpu_s: float = 0.0  # host tables: CPU time per message (occupies a core of the shared pool)

    def time(self, nbytes: float) -> float:
        """alpha + bytes / beta: one message alone on the link."""
        return self.alpha_s + self.cpu_s + nbytes / self.bandwidth


def _f(d: dict, key: str, where: str, default: float | None = None) -> float:
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
    # step / the table's CPU work for the same routing; calibrate.measure_cluster_cpu_scale)
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
            bw = _f(raw, "bandwidth", where) * _f(raw, "efficiency", where, 1.0)
            if bw <= 0:
                raise CostModelError(f"{where}.bandwidth: must be > 0")
            links[cls_name] = Link(_f(raw, "alpha_s", where), bw, _f(raw, "cpu_s", where, 0.0))
        if kind == "host":  # one host: every transfer is loopback
            for cls_name in LINK_CLASSES:
                links.setdefault(cls_name, links["loopback"])
            cores = float(d.get("host_cores", 0))
            if not cores > 0:
                raise CostModelError(f"{source}: host_cores = {cores}: must be > 0")
            cpu_scale = _f(d, "cpu_scale", source, 1.0)
            if not cpu_scale > 0:
                raise CostModelError(f"{source}: cpu_scale = {cpu_scale}: must be > 0")
            measured = d.get("measured")
            for part in ("expert", "dense", "head", "optimizer", "codec"):
                if not isinstance(measured, dict) or part not in measured:
                    raise CostModelError(f"{source}: measured.{part}: required for kind host")
            return cls(
                name=str(d.get("name", "host")), kind="host", links=links, host_cores=cores, cpu_scale=cpu_scale,
                step_overhead_s=_f(d, "step_overhead_s", source, 0.0),
                grad_bytes_per_param=_f(d, "grad_bytes_per_param", source, 4.0),
                measured=measured, source=source,
            )  # fmt: skip
        g = {k: _f(d, k, source) for k in ("peak_flops", "mfu_dense", "mfu_expert", "hbm_bandwidth")}
        if not all(g.values()):
            raise CostModelError(f"{source}: peak_flops, mfu_dense, mfu_expert, hbm_bandwidth must be > 0")
        return cls(
            name=str(d.get("name", "gpu")), kind="gpu", links=links, **g,
            param_bytes=_f(d, "param_bytes", source, 2.0),
            kernel_overhead_s=_f(d, "kernel_overhead_s", source, 0.0),
            layer_overhead_s=_f(d, "layer_overhead_s", source, 0.0),
            rpc_overhead_s=_f(d, "rpc_overhead_s", source, 0.0),
            codec_fixed_s=_f(d, "codec_fixed_s", source, 0.0),
            codec_s_per_byte=_f(d, "codec_s_per_byte", source, 0.0),
            backward_factor=_f(d, "backward_factor", source, 2.0),
            grad_bytes_per_param=_f(d, "grad_bytes_per_param", source, 2.0),
            optimizer_bytes_per_param=_f(d, "optimizer_bytes_per_param", source, 30.0),
            step_overhead_s=_f(d, "step_overhead_s", source, 0.0),
            source=source,
        )  # fmt: skip

    def with_links(self, **links: Link) -> HardwareTable:
        """A copy with some link classes replaced (what-if studies, tests)."""
        from dataclasses import replace

        return replace(self, links={**self.links, **links})

    def with_host_links(self, link: Link) -> HardwareTable:
        return self.with_links(**{c: link for c in LINK_CLASSES})


def scale_host_table(table: HardwareTable, stretch: float) -> HardwareTable:
    """The table for a machine where every process runs `stretch` times slower: every time x stretch, every
    bandwidth / stretch (the table's own ``cpu_scale`` is kept: ``CostModel.build`` applies it on top)."""
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


# ----------------------------------------------------------------------------------------------- cost model


def _interp(x: np.ndarray, curve: tuple, backward: bool, slope: float) -> np.ndarray:
    """Piecewise-linear through the measured points; below the first point proportional to x, beyond the last
    point its time + slope per unit."""
    xs, ys = np.asarray(curve[0]), np.asarray(curve[2] if backward else curve[1])
    inside = np.interp(x, xs, ys)
    below = ys[0] * x / xs[0]
    beyond = ys[-1] + (x - xs[-1]) * slope
    return np.where(x < xs[0], below, np.where(x > xs[-1], beyond, inside))


@dataclass(frozen=True)
class CostModel:
    """Per-call costs for one model on one table. All times in seconds, forward unless named otherwise."""

    table: HardwareTable
    model: ModelConfig
    seq_len: int
    wire_bytes: int  # bytes per activation value on the wire
    # compute: expert segment (fixed + per row, and a floor from reading the weights), dense layer, head
    expert_fixed_s: float
    expert_s_per_row: float
    expert_floor_s: float  # GPU roofline: time to read one expert's weights from HBM
    expert_bwd_factor: float  # backward / forward (for the floor: the weights are read backward_factor times)
    expert_bwd_fixed_s: float
    expert_bwd_s_per_row: float
    dense_fixed_s: float
    dense_s_per_token: float
    dense_bwd_factor: float
    head_fixed_s: float
    head_s_per_token: float
    head_bwd_factor: float
    optimizer_s_per_param: float
    codec_fixed_s: float
    codec_s_per_byte: float
    rpc_overhead_s: float
    dense_params_per_worker: int  # everything a router worker holds: layers' dense parts + embedding + norm
    expert_params: int  # one expert
    allreduce_alpha_s: float = 0.0  # host tables: measured gloo all-reduce (0 bandwidth = use the link classes)
    allreduce_bandwidth: float = 0.0
    # host tables measured on this model: the measured points (x, forward s, backward s), interpolated piecewise
    # linearly (beyond the last point: its time + the fitted slope). A line through 1..1024 rows missed the
    # measured 1-row and 64-row expert times by 2.7x and 1.4x.
    expert_curve: tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]] | None = None
    dense_curve: tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def host(self) -> bool:
        """True for a host table: every CPU cost is work on one pool of `host_cores` cores."""
        return self.table.kind == "host"

    @property
    def links(self) -> dict[str, Link]:
        return self.table.links

    @classmethod
    def build(cls, table: HardwareTable, model: ModelConfig, seq_len: int, wire_bytes: int = 2) -> CostModel:
        if table.kind == "host" and table.cpu_scale != 1.0:  # measured against the real cluster: costs x it
            table = replace(scale_host_table(table, table.cpu_scale), cpu_scale=1.0)
        counts = count_params(model)
        d, f = model.hidden_size, model.ffn_hidden_size
        dense_params_per_worker = (
            model.num_layers * counts.dense_params_per_layer + counts.breakdown["embedding"] + model.hidden_size
        )
        common = {
            "table": table, "model": model, "seq_len": seq_len, "wire_bytes": wire_bytes,
            "dense_params_per_worker": dense_params_per_worker, "expert_params": counts.expert_params,
        }  # fmt: skip
        expert_flops_row = 2.0 * 3 * d * f
        fl = flops_per_token(model, seq_len)
        dense_flops_tok = 2.0 * counts.dense_params_per_layer + fl["attention_score_flops_per_token_causal"] / (
            model.num_layers
        )
        head_flops_tok = 2.0 * model.vocab_size * d
        if table.kind == "gpu":
            rate_e = table.peak_flops * table.mfu_expert
            rate_d = table.peak_flops * table.mfu_dense
            return cls(
                **common,
                expert_fixed_s=table.kernel_overhead_s,
                expert_s_per_row=expert_flops_row / rate_e,
                expert_floor_s=counts.expert_params * table.param_bytes / table.hbm_bandwidth,
                expert_bwd_factor=table.backward_factor,
                expert_bwd_fixed_s=table.backward_factor * table.kernel_overhead_s,
                expert_bwd_s_per_row=table.backward_factor * expert_flops_row / rate_e,
                dense_fixed_s=table.layer_overhead_s,
                dense_s_per_token=dense_flops_tok / rate_d,
                dense_bwd_factor=table.backward_factor,
                head_fixed_s=table.layer_overhead_s,
                head_s_per_token=head_flops_tok / rate_d,
                head_bwd_factor=table.backward_factor,
                optimizer_s_per_param=table.optimizer_bytes_per_param / table.hbm_bandwidth,
                codec_fixed_s=table.codec_fixed_s,
                codec_s_per_byte=table.codec_s_per_byte,
                rpc_overhead_s=table.rpc_overhead_s,
            )  # fmt: skip
        m = table.measured
        ex, de, he = m["expert"], m["dense"], m["head"]
        # A table measured on another model size scales its per-row / per-token terms by FLOPs.
        ref = m.get("model", {})
        e_scale = expert_flops_row / (2.0 * 3 * ref["hidden_size"] * ref["ffn_hidden_size"]) if ref else 1.0
        d_scale = dense_flops_tok / ref["dense_flops_per_token"] if ref.get("dense_flops_per_token") else 1.0
        h_scale = head_flops_tok / ref["head_flops_per_token"] if ref.get("head_flops_per_token") else 1.0
        w = "measured"

        def curve(part: dict, x_key: str, scale: float) -> tuple | None:
            xs, fw, bw = part.get(x_key), part.get("times_s"), part.get("bwd_times_s")
            if scale != 1.0 or not (xs and fw and bw) or not (len(xs) == len(fw) == len(bw)):
                return None  # another model size: the fitted lines, scaled by FLOPs
            return tuple(map(float, xs)), tuple(map(float, fw)), tuple(map(float, bw))

        return cls(
            **common,
            expert_fixed_s=_f(ex, "fixed_s", f"{w}.expert"),
            expert_s_per_row=_f(ex, "s_per_row", f"{w}.expert") * e_scale,
            expert_floor_s=0.0,
            expert_bwd_factor=_f(ex, "backward_factor", f"{w}.expert", 2.0),
            expert_bwd_fixed_s=_f(ex, "bwd_fixed_s", f"{w}.expert", 2.0 * _f(ex, "fixed_s", f"{w}.expert")),
            expert_bwd_s_per_row=_f(ex, "bwd_s_per_row", f"{w}.expert", 2.0 * _f(ex, "s_per_row", f"{w}.expert"))
            * e_scale,
            dense_fixed_s=_f(de, "fixed_s", f"{w}.dense"),
            dense_s_per_token=_f(de, "s_per_token", f"{w}.dense") * d_scale,
            dense_bwd_factor=_f(de, "backward_factor", f"{w}.dense", 2.0),
            head_fixed_s=_f(he, "fixed_s", f"{w}.head"),
            head_s_per_token=_f(he, "s_per_token", f"{w}.head") * h_scale,
            head_bwd_factor=_f(he, "backward_factor", f"{w}.head", 2.0),
            optimizer_s_per_param=_f(m["optimizer"], "s_per_param", f"{w}.optimizer"),
            codec_fixed_s=_f(m["codec"], "fixed_s", f"{w}.codec"),
            codec_s_per_byte=_f(m["codec"], "s_per_byte", f"{w}.codec"),
            rpc_overhead_s=0.0,
            allreduce_alpha_s=float(m.get("allreduce", {}).get("alpha_s", 0.0)),
            allreduce_bandwidth=float(m.get("allreduce", {}).get("bandwidth", 0.0)),
            expert_curve=curve(ex, "rows", e_scale),
            dense_curve=curve(de, "tokens", d_scale),
        )  # fmt: skip

    # ------------------------------------------------------------------ compute

    def expert_time(self, rows: np.ndarray, backward: bool = False) -> np.ndarray:
        """Time of one expert segment on `rows` token rows, forward or backward (elementwise; 0 rows -> 0 s)."""
        rows = np.asarray(rows, dtype=np.float64)
        if self.expert_curve is not None:
            slope = self.expert_bwd_s_per_row if backward else self.expert_s_per_row
            return np.where(rows > 0, _interp(rows, self.expert_curve, backward, slope), 0.0)
        if backward:
            t = self.expert_bwd_fixed_s + np.maximum(rows * self.expert_bwd_s_per_row,
                                                     self.expert_bwd_factor * self.expert_floor_s)  # fmt: skip
        else:
            t = self.expert_fixed_s + np.maximum(rows * self.expert_s_per_row, self.expert_floor_s)
        return np.where(rows > 0, t, 0.0)

    def dense_time(self, tokens: np.ndarray | float) -> np.ndarray:
        """Forward time of one layer's dense part (norms, attention/LFA, router) on `tokens` tokens."""
        tokens = np.asarray(tokens, dtype=np.float64)
        if self.dense_curve is not None:
            return np.where(tokens > 0, _interp(tokens, self.dense_curve, False, self.dense_s_per_token), 0.0)
        return np.where(tokens > 0, self.dense_fixed_s + tokens * self.dense_s_per_token, 0.0)

    def dense_bwd_time(self, tokens: np.ndarray | float) -> np.ndarray:
        """Backward time of one layer's dense part on `tokens` tokens."""
        tokens = np.asarray(tokens, dtype=np.float64)
        if self.dense_curve is not None:
            slope = self.dense_s_per_token * self.dense_bwd_factor
            return np.where(tokens > 0, _interp(tokens, self.dense_curve, True, slope), 0.0)
        return self.dense_time(tokens) * self.dense_bwd_factor

    def head_time(self, tokens: np.ndarray | float) -> np.ndarray:
        """Forward time of embedding + final norm + LM head + loss on `tokens` tokens."""
        tokens = np.asarray(tokens, dtype=np.float64)
        return np.where(tokens > 0, self.head_fixed_s + tokens * self.head_s_per_token, 0.0)

    def message_bytes(self, rows: np.ndarray) -> np.ndarray:
        """Bytes of one dispatch (or result / grad) frame carrying `rows` token rows (0 rows -> no message)."""
        rows = np.asarray(rows, dtype=np.float64)
        return np.where(rows > 0, rows * (self.model.hidden_size * self.wire_bytes) + FRAME_HEADER_BYTES, 0.0)

    def codec_time(self, nbytes: np.ndarray) -> np.ndarray:
        """Encode + decode of one frame of `nbytes` bytes."""
        nbytes = np.asarray(nbytes, dtype=np.float64)
        return np.where(nbytes > 0, 2 * self.codec_fixed_s + nbytes * self.codec_s_per_byte, 0.0)

    def optimizer_time(self, params: float) -> float:
        return params * self.optimizer_s_per_param

    def describe(self) -> dict[str, Any]:
        """The derived coefficients, for reports."""
        keys = (
            "expert_fixed_s", "expert_s_per_row", "expert_floor_s", "expert_bwd_factor", "expert_bwd_fixed_s",
            "expert_bwd_s_per_row", "dense_fixed_s",
            "dense_s_per_token", "dense_bwd_factor", "head_fixed_s", "head_s_per_token", "optimizer_s_per_param",
            "codec_fixed_s", "codec_s_per_byte", "rpc_overhead_s",
        )  # fmt: skip
        out: dict[str, Any] = {"table": self.table.name, "kind": self.table.kind, "wire_bytes": self.wire_bytes}
        out.update({k: getattr(self, k) for k in keys})
        out["links"] = {c: vars(link) for c, link in self.links.items()}
        if self.host:
            out["host_cores"] = self.table.host_cores
        return out
