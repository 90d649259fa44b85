"""Typed configuration: one pydantic model per component, composed into RuntimeConfig.

`load_config(path)` reads YAML; every error names the field path, the value and what was expected,
e.g. ``model.top_k = 5: must be <= model.num_experts (4)``. Unknown keys are rejected.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem; the message names the field path, the value and what was expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# ----------------------------------------------------------------------------------------------- model

PRESETS: dict[str, dict[str, Any]] = {
    # Yuan 2.0-M32 exactly as in the paper / IEIT-Yuan/Yuan2.0-M32 (see shared yuan-m32.md).
    "yuan-m32": dict(
        vocab_size=135040, hidden_size=2048, num_layers=24, num_heads=16, head_dim=256, rotary_dim=128,
        rope_base=10000.0, num_experts=32, top_k=2, ffn_hidden_size=8192, router="attention",
        aux_loss_coeff=0.0, norm_eps=1e-6, max_seq_len=4096, lfa=True,
    ),
    # Trains on this machine in minutes.
    "small": dict(
        vocab_size=264, hidden_size=256, num_layers=4, num_heads=4, head_dim=64, rotary_dim=32,
        rope_base=10000.0, num_experts=16, top_k=2, ffn_hidden_size=512, router="attention",
        aux_loss_coeff=0.0, norm_eps=1e-6, max_seq_len=256, lfa=True,
    ),
    # For tests: trains in seconds.
    "tiny": dict(
        vocab_size=264, hidden_size=64, num_layers=2, num_heads=2, head_dim=32, rotary_dim=16,
        rope_base=10000.0, num_experts=8, top_k=2, ffn_hidden_size=128, router="attention",
        aux_loss_coeff=0.0, norm_eps=1e-6, max_seq_len=128, lfa=True,
    ),
}


class ModelConfig(_Strict):
    """The model. `preset` fills every field not given explicitly."""

    preset: Literal["yuan-m32", "small", "tiny"] | None = None
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    rotary_dim: int = Field(ge=0)
    rope_base: float = Field(gt=0)
    # exact: fp32 rotary tables (Megatron, vLLM); hf: the released HF code's bf16 tables, bit for bit
    rope: Literal["exact", "hf"] = "exact"
    num_experts: int = Field(gt=0)
    top_k: int = Field(gt=0)
    ffn_hidden_size: int = Field(gt=0)
    router: Literal["attention", "linear"] = "attention"
    aux_loss_coeff: float = Field(default=0.0, ge=0)
    norm_eps: float = Field(default=1e-6, gt=0)
    max_seq_len: int = Field(gt=0)
    lfa: bool = True  # Localized Filtering-based Attention; False = plain causal attention
    init_std: float = Field(default=0.02, gt=0)
    # storage dtype of the expert weights (model/weight_storage.py); compute stays fp32: each expert is converted
    # right before its matmuls. bfloat16 halves the experts' memory, for forward and generation (training refuses it)
    expert_weight_dtype: Literal["float32", "bfloat16"] = "float32"
    checkpoint: str | None = None  # an HF-layout Yuan checkpoint directory (moe_runtime/checkpoint)
    # Routing rule (model/routing.py), for either router: topk (default) | grouped (MoGE: top-(k/G) in each of
    # routing_groups equal expert groups) | top_p (smallest set reaching top_p, 1..k_max experts, optional
    # entropy loss dynamic_loss_coeff) | node_limited (experts on at most max_nodes nodes, DeepSeek-V3)
    routing: Literal["topk", "grouped", "top_p", "node_limited"] = "topk"
    routing_groups: int = 1
    top_p: float = 1.0
    k_max: int | None = None  # None = num_experts
    dynamic_loss_coeff: float = 0.0
    max_nodes: int = 1

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in PRESETS:
                raise ValueError(f"preset = {name!r}: expected one of {sorted(PRESETS)}")
            return {**PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k = {self.top_k}: must be <= num_experts ({self.num_experts})")
        if self.rotary_dim > self.head_dim or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim = {self.rotary_dim}: must be even and <= head_dim ({self.head_dim})")
        if self.lfa and self.hidden_size % 2:
            raise ValueError(f"hidden_size = {self.hidden_size}: LFA needs an even hidden size (it filters to d/2)")
        self._check_routing()
        return self

    def _check_routing(self) -> None:
        used_by = {"routing_groups": ("grouped", 1), "top_p": ("top_p", 1.0), "k_max": ("top_p", None),
                   "dynamic_loss_coeff": ("top_p", 0.0), "max_nodes": ("node_limited", 1)}
        for name, (kind, default) in used_by.items():
            value = getattr(self, name)
            if self.routing != kind and value != default:
                raise ValueError(f"{name} = {value!r}: only used by routing = {kind!r} (routing is {self.routing!r})")
        g, k, e = self.routing_groups, self.top_k, self.num_experts
        if g < 1 or e % g or k % g:
            raise ValueError(f"routing_groups = {g}: must be >= 1 and divide num_experts ({e}) and top_k ({k}), "
                             "so every group takes top_k / routing_groups experts")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p = {self.top_p}: must be in (0, 1]")
        if self.k_max is not None and not 1 <= self.k_max <= e:
            raise ValueError(f"k_max = {self.k_max}: must be in [1, num_experts = {e}]")
        if not self.dynamic_loss_coeff >= 0.0:
            raise ValueError(f"dynamic_loss_coeff = {self.dynamic_loss_coeff}: must be >= 0")
        if self.max_nodes < 1:
            raise ValueError(f"max_nodes = {self.max_nodes}: must be >= 1")

    @property
    def max_copies_per_token(self) -> int:
        """Most token copies one token sends to experts: k_max (or num_experts) for top_p, else top_k."""
        if self.routing == "top_p":
            return self.k_max if self.k_max is not None else self.num_experts
        return self.top_k

    @property
    def attn_width(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        return cls(preset=name, **overrides)


# ----------------------------------------------------------------------------------------------- data / train


class DataConfig(_Strict):
    # stdlib: byte-level text of the interpreter's standard-library sources; files: your own text / jsonl documents
    # (moe_runtime/data_files.py), tokenised with the checkpoint's tokenizer, packed with <eod> between documents
    source: Literal["stdlib", "files"] = "stdlib"
    val_fraction: float = Field(default=0.05, gt=0, lt=1)
    split_seed: int = 0
    max_files: int | None = Field(default=None, gt=0)  # cap the corpus (tests); None = all files
    paths: list[str] = Field(default_factory=list)  # source files: file paths or globs (** recursive), in order
    format: Literal["auto", "text", "jsonl"] = "auto"  # auto: *.jsonl -> jsonl, anything else -> text
    text_field: str = Field(default="text", min_length=1)  # jsonl: the field that holds a document's text
    # files: positions restart at 0 after each <eod> (Megatron's reset_position_ids). False = the released HF
    # inference code (it computes reset positions, then drops them: positions run 0..S-1 across documents)
    reset_positions: bool = False

    @model_validator(mode="after")
    def _check_files(self) -> DataConfig:
        if self.source == "files" and not self.paths:
            raise ValueError("data.paths = []: data.source = 'files' needs at least one file path or glob")
        if self.source != "files" and self.paths:
            raise ValueError(f"data.paths = {self.paths!r}: only read with data.source = 'files' "
                             f"(source is {self.source!r})")
        return self


class TrainConfig(_Strict):
    steps: int = Field(default=50, gt=0)
    batch_size: int = Field(default=8, gt=0)  # sequences per global step
    seq_len: int = Field(default=64, gt=1)
    micro_batches: int = Field(default=1, gt=0)  # per router worker, gradients accumulated
    lr: float = Field(default=3e-3, gt=0)
    min_lr: float = Field(default=3e-4, ge=0)
    warmup_steps: int = Field(default=5, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(default=0.1, ge=0)
    grad_clip: float = Field(default=1.0, ge=0)  # 0 = off
    seed: int = 0
    val_batches: int = Field(default=4, gt=0)
    checkpoint_every: int = Field(default=0, ge=0)  # automatic checkpoint every K steps; 0 = off
    checkpoint_dir: str = "runs/checkpoints"
    # Compute precision on GPUs: bf16 = bf16 matmuls, fp32 master weights and AdamW state. Refused on a CPU party
    # (model/device.py: bf16 matmul is very slow there). Independent of transport.wire_dtype.
    precision: Literal["fp32", "bf16"] = "fp32"

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr = {self.min_lr}: must be <= lr ({self.lr})")
        return self


# ----------------------------------------------------------------------------------------------- runtime


class TransportConfig(_Strict):
    """Data plane (msgpack frames over a TCP lane or gRPC; control calls over gRPC)."""

    host: str = "127.0.0.1"
    wire_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    deadline_s: float = Field(default=30.0, gt=0)
    max_message_mb: int | None = Field(default=None, gt=0)  # None = derived from the largest frame possible
    auth_token: str | None = None  # None = generated at start
    check_finite: bool = False  # reject NaN/Inf in frames (costs a pass over the data)
    # serving, an expert whose every replica is down: fail = an error naming actor, layer and experts
    # (dispatch/failover.py); mask = the routers exclude those experts (top-k among the live ones, gates
    # renormalised) until the cluster heals, and responses list them as `degraded`. Training never masks.
    on_expert_failure: Literal["fail", "mask"] = "fail"
    server_threads: int = Field(default=4, gt=0)
    # two_batch: each router worker splits a micro-batch into two halves that take turns, so one half's expert
    # exchange is in flight while the other runs attention and the router, forward and backward (model/two_batch.py)
    overlap: Literal["none", "two_batch"] = "none"
    # frames larger than this many MiB go as chunked streams of messages of this size (dispatch/chunks.py): any frame
    # size crosses gRPC, copying overlaps sending; None = one message per frame, except that a frame larger than
    # max_message_mb always streams (automatic chunks, never a failure: the limit bounds each message, not a frame)
    chunk_mb: float | None = Field(default=None, gt=0)
    # tcp: Dispatch / Backward frames go over each expert server's TCP lane (dispatch/lane.py: the same frames, no
    # gRPC copies or per-call gRPC cost; chunk_mb does not apply there); grpc: over gRPC (Health / EndStep always are)
    lane: Literal["tcp", "grpc"] = "tcp"


class ClusterConfig(_Strict):
    """Ray cluster layout."""

    ray_address: str | None = None  # None = start a local Ray; "auto" or "ray://..." connects
    # seconds to reach the cluster at ray_address (TCP, GCS, ray.init) before failing with what to check
    connect_timeout_s: float = Field(default=30.0, gt=0)
    num_gpus: int = Field(default=4, ge=0)  # GPUs a local Ray advertises (fake on a CPU machine)
    num_nodes: int = Field(default=1, gt=0)  # >1 = simulated nodes on this machine (local mode only)
    expert_actors: int = Field(default=4, gt=0)
    router_workers: int = Field(default=2, gt=0)
    gpus_per_expert_actor: float = Field(default=1.0, ge=0)
    # 0 = the dense model on the CPU (Ray hides every GPU from a num_gpus=0 actor); e.g. 0.25 shares a GPU
    gpus_per_router_worker: float = Field(default=0.0, ge=0)
    cpus_per_actor: float = Field(default=0.0, ge=0)  # num_gpus=1 actors take 1 CPU by default: see README
    torch_threads: int = Field(default=1, gt=0)  # intra-op threads per actor
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "SPREAD"
    max_restarts: int = Field(default=3, ge=0)
    # a party that answers no control call (or recovery's ping) within this long, or a router worker that has not
    # finished a step's forward/backward this long after its peer, is hung: killed and recovered. Keep it above
    # transport.deadline_s (a worker waiting on a hung expert actor must fail its exchange first)
    hang_timeout_s: float = Field(default=120.0, gt=0)
    grad_sync: Literal["gloo", "ray"] = "gloo"

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        need = self.expert_actors * self.gpus_per_expert_actor
        if self.ray_address is None and need > self.num_gpus:
            raise ValueError(
                f"expert_actors = {self.expert_actors}: needs {need:g} GPUs but num_gpus = {self.num_gpus}"
            )
        need += self.router_workers * self.gpus_per_router_worker
        if self.ray_address is None and need > self.num_gpus:
            raise ValueError(
                f"gpus_per_router_worker = {self.gpus_per_router_worker:g}: expert actors and router workers need "
                f"{need:g} GPUs but num_gpus = {self.num_gpus}"
            )
        return self


class SchedulerConfig(_Strict):
    enabled: bool = False
    every_steps: int = Field(default=10, gt=0)
    ema_decay: float = Field(default=0.8, ge=0, lt=1)
    imbalance_threshold: float = Field(default=1.15, ge=1)  # max/mean tokens per actor that triggers a look
    min_gain: float = Field(default=0.05, ge=0)  # minimum predicted relative drop of the max actor load
    byte_budget_mb: float = Field(default=1024.0, gt=0)  # most bytes moved per rebalance
    # A copy must lower its layer's max actor load by at least this fraction of the layer's mean load:
    # without a price per copy the policy spends 2-3x the bytes for ~0.1% balance.
    min_gain_per_copy: float = Field(default=0.01, ge=0)
    slots_per_actor: int | None = Field(default=None, gt=0)  # expert slots per actor per layer; None = auto
    # node: every replicated (hot) expert keeps a replica off the node of its other replicas, so losing one node
    # leaves it a live copy (scheduler/anti_affinity.py); none: replicas go wherever the policy puts them
    replica_anti_affinity: Literal["none", "node"] = "none"


class SimConfig(_Strict):
    gpus: int = Field(default=8, gt=0)
    gpus_per_node: int = Field(default=8, gt=0)
    tokens_per_gpu: int = Field(default=4096, gt=0)  # tokens per router worker per step
    hardware: str = "h100"  # name of a cost table (sim/hardware.py, tables in sim/tables/) or a path to a calibrated YAML
    trace: Literal["uniform", "zipf", "drift"] = "uniform"
    zipf_s: float = Field(default=1.0, ge=0)
    training: bool = True
    # colocated: each GPU runs one router worker + one expert actor (Megatron-style EP); separate: the runtime's
    # default layout (router workers and expert actors on their own devices); auto: colocated when
    # router_workers == expert_actors == sim.gpus
    layout: Literal["auto", "colocated", "separate"] = "auto"


class RuntimeConfig(_Strict):
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(preset="tiny"))
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    sim: SimConfig = Field(default_factory=SimConfig)

    @model_validator(mode="after")
    def _check(self) -> RuntimeConfig:
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len = {self.train.seq_len}: must be <= model.max_seq_len ({self.model.max_seq_len})"
            )
        if self.train.batch_size % self.cluster.router_workers:
            raise ValueError(
                f"train.batch_size = {self.train.batch_size}: must be a multiple of "
                f"cluster.router_workers ({self.cluster.router_workers})"
            )
        g = self.model.routing_groups
        if self.model.routing == "grouped" and self.cluster.expert_actors % g:
            raise ValueError(
                f"model.routing_groups = {g}: must divide cluster.expert_actors ({self.cluster.expert_actors}), "
                "each expert group lives on its own actors"
            )
        return self


# ----------------------------------------------------------------------------------------------- loading

_SECTIONS = set(RuntimeConfig.model_fields)


def _nearest_key(loc: list[str]) -> str:
    """'; did you mean 'x'?' for the valid key of that section closest to the unknown one ('' when none is close)."""
    import difflib

    model: Any = RuntimeConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        model = getattr(field, "annotation", None) if field is not None else None
        if model is None or not hasattr(model, "model_fields"):
            return ""
    valid = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.6) if loc else []
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _format_errors(err: ValidationError, data: Any) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not str(p).startswith("function-")]
        path = ".".join(loc)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{path} = {e['input']!r}: unknown key{_nearest_key(loc)}")
            continue
        if e["type"] == "missing":
            lines.append(f"{path}: required field is missing")
            continue
        # model validators report "<field> = <value>: ..." relative to their model: make the path absolute.
        if msg.split(" = ")[0].isidentifier() and " = " in msg:
            prefix = ".".join(loc)
            lines.append(f"{prefix + '.' if prefix else ''}{msg}")
        else:
            lines.append(f"{path} = {e.get('input')!r}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any] | None, source: str = "<dict>") -> RuntimeConfig:
    """Validate a plain dict (e.g. parsed YAML) into a RuntimeConfig with readable errors."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections {sorted(_SECTIONS)}")
    try:
        return RuntimeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid config\n{_format_errors(err, data)}") from None


def load_config(path: str | Path) -> RuntimeConfig:
    """Read a YAML config. A file with a top-level `moe_runtime:` key (ray-up / KubeRay files) uses that section."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with open(path) as f:  # a stream with a name: YAML errors then say `in "<path>", line N`, not <unicode string>
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        logging.getLogger(__name__).warning(
            "config file %s is empty: every setting takes its default (`moe-runtime config show --config %s` "
            "prints them)", path, path)
    if isinstance(data, dict) and "moe_runtime" in data:
        data = data["moe_runtime"]
    return parse_config(data, source=str(path))
