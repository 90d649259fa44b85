"""Routing traces: which experts the tokens of each router worker chose, per step and layer.

A trace is what the simulator replays: ``counts[step, chunk, layer, expert]`` = token copies (tokens x top-k)
that one chunk of one step sent to one expert. With a variable number of copies per token (top-p routing) the
trace also carries ``token_counts[step, chunk]`` (tokens per chunk; ``top_k`` is then the most copies a token can
make) instead of inferring tokens as copies / top_k. A chunk is one router worker's micro-batch:
``chunks = router_workers * micro_batches`` and chunk ``c`` belongs to worker ``c // micro_batches`` (the same
chunking as ``training.chunk_rows``). Counts are all the simulator needs: ``split_over_replicas`` turns them into
rows per (worker, actor), exactly as ``DispatchPlan.build`` does with the ids.

Sources:
- recorded from a real run: ``TraceRecorder.record(step, chunk, layer, expert_ids=[T, k])`` (or ``counts=[E]``,
  or ``record_plans`` with the DispatchPlans of one chunk's forward, or ``record_layers`` with a [L, E] matrix
  such as ``MoETransformer.expert_load()``);
- synthetic: ``synthetic_trace("uniform" | "zipf" | "drift", ...)``, deterministic given the seed.

Files (chosen by suffix):
- ``.npz``: arrays ``counts`` (int32 [S, C, L, E]), optionally ``token_counts`` (int64 [S, C]), and ``meta`` (a JSON string: top_k, micro_batches, source,
  generator parameters). Compact; the default.
- ``.jsonl``: line 1 is the header ``{"format": "moe-runtime-trace", "version": 1, "top_k", "micro_batches",
  "num_layers", "num_experts", "meta"}``; then one line per (step, chunk, layer):
  ``{"step", "chunk", "layer", "counts": [E ints]}`` or, instead of counts, ``"expert_ids": [[k ints] per token]``
  (rows may differ in length: variable copies), and optionally ``"tokens": n`` (the chunk's tokens).
  Missing (step, chunk, layer) lines are zero counts. Human-readable and easy to write from other tools.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "RoutingTrace",
    "TraceError",
    "TraceRecorder",
    "load_trace",
    "synthetic_trace",
    "zipf_shares",
]

TraceKind = Literal["uniform", "zipf", "drift"]
_FORMAT = "moe-runtime-trace"


class TraceError(ValueError):
    pass


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    counts: np.ndarray  # int64 [steps, chunks, layers, experts], read-only
    top_k: int  # copies per token; with token_counts, the most copies one token can make
    micro_batches: int = 1
    meta: dict[str, Any] = field(default_factory=dict)
    token_counts: np.ndarray | None = None  # int64 [steps, chunks]: tokens per chunk (variable copies); None = counts/top_k

    def __post_init__(self) -> None:
        arr = np.array(self.counts, dtype=np.int64)  # a copy
        if arr.ndim != 4 or 0 in arr.shape:
            raise TraceError(f"counts must be a non-empty [steps, chunks, layers, experts] array, got {arr.shape}")
        if (arr < 0).any():
            raise TraceError("counts must be >= 0")
        if self.top_k <= 0 or self.top_k > arr.shape[3]:
            raise TraceError(f"top_k = {self.top_k}: must be in [1, {arr.shape[3]}]")
        if self.micro_batches <= 0 or arr.shape[1] % self.micro_batches:
            raise TraceError(
                f"micro_batches = {self.micro_batches}: must divide the number of chunks ({arr.shape[1]})"
            )
        arr.setflags(write=False)
        object.__setattr__(self, "counts", arr)
        object.__setattr__(self, "meta", dict(self.meta))
        if self.token_counts is not None:
            tok = np.array(self.token_counts, dtype=np.int64)
            if tok.shape != arr.shape[:2] or (tok < 0).any():
                raise TraceError(f"token_counts has shape {tok.shape}: expected non-negative {arr.shape[:2]} "
                                 "[steps, chunks]")
            copies = arr.sum(-1)  # [S, C, L]
            if (copies > self.top_k * tok[..., None]).any():
                raise TraceError(f"token_counts do not fit the counts: a token makes at most top_k = {self.top_k} "
                                 "copies per layer")
            tok.setflags(write=False)
            object.__setattr__(self, "token_counts", tok)

    # ------------------------------------------------------------------ shape

    @property
    def num_steps(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_chunks(self) -> int:
        return int(self.counts.shape[1])

    @property
    def num_workers(self) -> int:
        return self.num_chunks // self.micro_batches

    @property
    def num_layers(self) -> int:
        return int(self.counts.shape[2])

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[3])

    def tokens(self) -> np.ndarray:
        """[steps, chunks] tokens per chunk (token_counts, else layer 0's copies / top_k)."""
        if self.token_counts is not None:
            return self.token_counts
        return self.counts[:, :, 0, :].sum(-1) // self.top_k

    def copies_per_token(self) -> float:
        """Mean token copies per token and layer over the trace (top_k without token_counts)."""
        tokens = float(self.tokens().sum()) * self.num_layers
        return float(self.counts.sum()) / tokens if tokens else float(self.top_k)

    def step(self, i: int) -> np.ndarray:
        """[chunks, layers, experts] of step i (steps wrap around: a short trace can drive a long run)."""
        return self.counts[i % self.num_steps]

    def load(self, steps: Sequence[int] | None = None) -> np.ndarray:
        """[layers, experts] float64 token copies summed over chunks (and the given steps; default all)."""
        sel = self.counts if steps is None else self.counts[np.asarray(steps) % self.num_steps]
        return sel.sum(axis=(0, 1)).astype(np.float64)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutingTrace):
            return NotImplemented
        return (
            self.top_k == other.top_k
            and self.micro_batches == other.micro_batches
            and np.array_equal(self.counts, other.counts)
            and np.array_equal(self.tokens(), other.tokens())
        )

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"top_k": self.top_k, "micro_batches": self.micro_batches, **self.meta}
        if path.suffix == ".npz":
            tmp = path.with_name(path.name + ".tmp.npz")
            extra = {} if self.token_counts is None else {"token_counts": self.token_counts}
            np.savez_compressed(tmp, counts=self.counts.astype(np.int32), meta=np.array(json.dumps(meta)), **extra)
            tmp.replace(path)
        elif path.suffix == ".jsonl":
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("w") as f:
                header = {
                    "format": _FORMAT, "version": 1, "top_k": self.top_k, "micro_batches": self.micro_batches,
                    "num_layers": self.num_layers, "num_experts": self.num_experts, "meta": self.meta,
                }  # fmt: skip
                f.write(json.dumps(header) + "\n")
                for s in range(self.num_steps):
                    for c in range(self.num_chunks):
                        for layer in range(self.num_layers):
                            rec = {"step": s, "chunk": c, "layer": layer, "counts": self.counts[s, c, layer].tolist()}
                            if self.token_counts is not None and layer == 0:
                                rec["tokens"] = int(self.token_counts[s, c])
                            f.write(json.dumps(rec) + "\n")
            tmp.replace(path)
        else:
            raise TraceError(f"{path}: unknown trace format {path.suffix!r}: use .npz or .jsonl")
        return path

    @classmethod
    def load_file(cls, path: str | Path) -> RoutingTrace:
        return load_trace(path)


def load_trace(path: str | Path) -> RoutingTrace:
    path = Path(path)
    if not path.exists():
        raise TraceError(f"trace file {str(path)!r} does not exist")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                counts = z["counts"]
                meta = json.loads(str(z["meta"]))
                token_counts = z["token_counts"] if "token_counts" in z.files else None
        except (KeyError, ValueError, OSError) as err:
            raise TraceError(f"{path}: not a routing trace: {err}") from None
        top_k, mb = int(meta.pop("top_k")), int(meta.pop("micro_batches", 1))
        return RoutingTrace(counts, top_k, mb, meta, token_counts)
    if path.suffix == ".jsonl":
        return _load_jsonl(path)
    raise TraceError(f"{path}: unknown trace format {path.suffix!r}: use .npz or .jsonl")


def _load_jsonl(path: Path) -> RoutingTrace:
    with path.open() as f:
        lines = [(i, ln) for i, ln in enumerate(f, start=1) if ln.strip()]
    if not lines:
        raise TraceError(f"{path}: empty trace")
    try:
        header = json.loads(lines[0][1])
        if header.get("format") != _FORMAT:
            raise TraceError(f"{path}:1: header must have format {_FORMAT!r}")
        top_k, mb = int(header["top_k"]), int(header.get("micro_batches", 1))
        n_layers, n_experts = int(header["num_layers"]), int(header["num_experts"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise TraceError(f"{path}:1: bad header: {err!r}") from None
    recs: dict[tuple[int, int, int], np.ndarray] = {}
    tokens: dict[tuple[int, int], int] = {}
    for lineno, line in lines[1:]:
        try:
            rec = json.loads(line)
            key = (int(rec["step"]), int(rec["chunk"]), int(rec["layer"]))
            if "counts" in rec:
                row = np.asarray(rec["counts"], dtype=np.int64)
            else:
                ids = np.asarray([i for row in rec["expert_ids"] for i in row], dtype=np.int64)
                if ids.size and (ids.min() < 0 or ids.max() >= n_experts):
                    raise ValueError(f"expert id out of range [0, {n_experts})")
                row = np.bincount(ids, minlength=n_experts)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise TraceError(f"{path}:{lineno}: not a trace record: {err!r}") from None
        if row.shape != (n_experts,) or not 0 <= key[2] < n_layers or min(key) < 0:
            raise TraceError(f"{path}:{lineno}: record {key} does not fit {n_layers} layers x {n_experts} experts")
        recs[key] = row
        if "tokens" in rec:
            tokens[key[:2]] = int(rec["tokens"])
    if not recs:
        raise TraceError(f"{path}: no records")
    steps = 1 + max(k[0] for k in recs)
    chunks = 1 + max(k[1] for k in recs)
    chunks = -(-chunks // mb) * mb
    counts = np.zeros((steps, chunks, n_layers, n_experts), dtype=np.int64)
    for (s, c, layer), row in recs.items():
        counts[s, c, layer] = row
    token_counts = None
    if tokens:  # chunks without a "tokens" field: copies / top_k
        token_counts = counts[:, :, 0, :].sum(-1) // top_k
        for (s, c), n in tokens.items():
            token_counts[s, c] = n
    return RoutingTrace(counts, top_k, mb, dict(header.get("meta") or {}), token_counts)


# ----------------------------------------------------------------------------------------------- recording


class TraceRecorder:
    """Collects counts from a real run. Steps and chunks may arrive in any order; unrecorded ones are zero."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, micro_batches: int = 1,
                 meta: dict[str, Any] | None = None):  # fmt: skip
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.micro_batches = micro_batches
        self.meta = dict(meta or {})
        self._counts: dict[tuple[int, int], np.ndarray] = {}
        self._tokens: dict[tuple[int, int], int] = {}  # variable copies: tokens per chunk, when given

    def _row(self, step: int, chunk: int) -> np.ndarray:
        key = (int(step), int(chunk))
        if key not in self._counts:
            self._counts[key] = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        return self._counts[key]

    def _note_tokens(self, step: int, chunk: int, tokens: int | None) -> None:
        if tokens is not None:
            self._tokens[(int(step), int(chunk))] = int(tokens)

    def record(self, step: int, chunk: int, layer: int, *, expert_ids: Any = None, counts: Any = None,
               mask: Any = None, tokens: int | None = None) -> None:  # fmt: skip
        """One layer of one chunk: `expert_ids` [T, k] (tensor or array; `mask` [T, k] marks the real slots of
        padded ids) or `counts` [E]. `tokens`: the chunk's tokens (needed when copies per token vary; ids with a
        mask give it)."""
        if (expert_ids is None) == (counts is None):
            raise TraceError("record(): give exactly one of expert_ids or counts")
        if not 0 <= layer < self.num_layers:
            raise TraceError(f"layer = {layer}: not in [0, {self.num_layers})")
        if expert_ids is not None:
            ids = np.asarray(expert_ids.cpu() if hasattr(expert_ids, "cpu") else expert_ids, dtype=np.int64)
            if mask is not None:
                keep = np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask, dtype=bool)
                if keep.shape != ids.shape:
                    raise TraceError(f"mask has shape {keep.shape}: expected expert_ids' {ids.shape}")
                tokens = ids.shape[0] if tokens is None else tokens
                ids = ids[keep]
            ids = ids.reshape(-1)
            if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
                raise TraceError(f"expert ids out of range [0, {self.num_experts})")
            row = np.bincount(ids, minlength=self.num_experts)
        else:
            row = np.asarray(counts.cpu() if hasattr(counts, "cpu") else counts, dtype=np.int64)
            if row.shape != (self.num_experts,):
                raise TraceError(f"counts has shape {row.shape}: expected ({self.num_experts},)")
        self._row(step, chunk)[layer] += row
        self._note_tokens(step, chunk, tokens)

    def record_layers(self, step: int, chunk: int, counts_le: Any, tokens: int | None = None) -> None:
        """All layers of one chunk at once: [L, E] (e.g. MoETransformer.expert_load()); `tokens` as in record."""
        arr = np.asarray(counts_le.cpu() if hasattr(counts_le, "cpu") else counts_le, dtype=np.int64)
        if arr.shape != (self.num_layers, self.num_experts):
            raise TraceError(f"counts has shape {arr.shape}: expected ({self.num_layers}, {self.num_experts})")
        self._row(step, chunk)[:] += arr
        self._note_tokens(step, chunk, tokens)

    def record_plans(self, step: int, chunk: int, plans: Sequence[Any]) -> None:
        """The DispatchPlans of one chunk's forward (one per layer, in layer order or with .layer set)."""
        for plan in plans:
            self.record(step, chunk, int(plan.layer), counts=plan.expert_counts, tokens=plan.num_tokens)

    def trace(self) -> RoutingTrace:
        if not self._counts:
            raise TraceError("TraceRecorder.trace(): nothing recorded")
        steps = 1 + max(s for s, _ in self._counts)
        chunks = 1 + max(c for _, c in self._counts)
        chunks = -(-chunks // self.micro_batches) * self.micro_batches
        counts = np.zeros((steps, chunks, self.num_layers, self.num_experts), dtype=np.int64)
        for (s, c), row in self._counts.items():
            counts[s, c] = row
        token_counts = None
        if self._tokens:  # chunks recorded without tokens: copies / top_k
            token_counts = counts[:, :, 0, :].sum(-1) // self.top_k
            for (s, c), n in self._tokens.items():
                token_counts[s, c] = n
        return RoutingTrace(counts, self.top_k, self.micro_batches, {"source": "recorded", **self.meta},
                            token_counts)


# ----------------------------------------------------------------------------------------------- synthetic


def _cap_shares(p: np.ndarray, cap: float) -> np.ndarray:
    """Water-fill: no share above `cap` (a token picks an expert at most once, so an expert gets <= 1/k of the
    copies); the excess goes to the others in proportion to their shares. p sums to 1 along the last axis."""
    p = np.array(p, dtype=np.float64)
    for _ in range(p.shape[-1]):
        over = p > cap + 1e-15
        if not over.any():
            break
        excess = np.where(over, p - cap, 0.0).sum(-1, keepdims=True)
        p = np.where(over, cap, p)
        free = np.where(p < cap - 1e-15, p, 0.0)
        p = p + excess * free / np.maximum(free.sum(-1, keepdims=True), 1e-300)
    return p / p.sum(-1, keepdims=True)


def zipf_shares(num_experts: int, s: float, top_k: int = 1) -> np.ndarray:
    """Load share of the expert of rank r (0 = hottest): proportional to 1 / (r + 1)^s, capped at 1/top_k."""
    p = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** s
    return _cap_shares(p / p.sum(), 1.0 / top_k)


def _layer_perms(rng: np.random.Generator, layers: int, experts: int) -> np.ndarray:
    return np.stack([rng.permutation(experts) for _ in range(layers)])


def synthetic_trace(
    kind: TraceKind,
    *,
    steps: int,
    workers: int,
    layers: int,
    experts: int,
    top_k: int,
    tokens_per_worker: int,
    micro_batches: int = 1,
    zipf_s: float = 1.0,
    hot_experts: int | None = None,
    hot_fraction: float = 0.5,
    drift_per_step: float = 1.0,
    seed: int = 0,
) -> RoutingTrace:
    """A deterministic synthetic trace.

    - ``uniform``: every expert has the same expected share of the copies.
    - ``zipf``: shares follow Zipf(s) over ranks (``zipf_shares``); which expert has which rank is a seeded
      permutation per layer (fixed over steps).
    - ``drift``: ``hot_experts`` experts (default E/8) take ``hot_fraction`` of the copies, the rest share the
      remainder; the hot set slides along the per-layer permutation by ``drift_per_step`` experts per step.
    Counts per chunk are multinomial(tokens * k, shares). Step s draws from its own generator seeded with
    (seed, s): the first S steps of a longer trace are the same trace.
    """
    if min(steps, workers, layers, experts, top_k, tokens_per_worker, micro_batches) <= 0:
        raise TraceError("steps, workers, layers, experts, top_k, tokens_per_worker, micro_batches must be > 0")
    if top_k > experts:
        raise TraceError(f"top_k = {top_k}: must be <= experts ({experts})")
    if tokens_per_worker % micro_batches:
        raise TraceError(f"tokens_per_worker = {tokens_per_worker}: must be a multiple of micro_batches")
    perms = _layer_perms(np.random.default_rng([seed, 0x5EED]), layers, experts)
    chunks = workers * micro_batches
    copies = tokens_per_worker // micro_batches * top_k
    ranks = np.empty_like(perms)  # ranks[l, e] = rank of expert e in layer l
    np.put_along_axis(ranks, perms, np.arange(experts)[None, :].repeat(layers, 0), axis=1)

    if kind == "uniform":
        base = np.full((layers, experts), 1.0 / experts)
    elif kind == "zipf":
        if zipf_s < 0:
            raise TraceError(f"zipf_s = {zipf_s}: must be >= 0")
        base = zipf_shares(experts, zipf_s, top_k)[ranks]
    elif kind == "drift":
        h = hot_experts if hot_experts is not None else max(1, experts // 8)
        if not 0 < h < experts or not 0 < hot_fraction < 1:
            raise TraceError(f"hot_experts = {h}, hot_fraction = {hot_fraction}: need 0 < h < E, 0 < f < 1")
        base = None
    else:
        raise TraceError(f"trace kind {kind!r}: expected uniform, zipf or drift")

    out = np.empty((steps, chunks, layers, experts), dtype=np.int64)
    for s in range(steps):
        if base is None:
            offset = int(np.floor(s * drift_per_step))
            hot_rank = (ranks - offset) % experts < h  # [L, E]
            p = np.where(hot_rank, hot_fraction / h, (1 - hot_fraction) / (experts - h))
            p = _cap_shares(p, 1.0 / top_k)
        else:
            p = base
        rng = np.random.default_rng([seed, s])
        out[s] = rng.multinomial(copies, p, size=(chunks, layers))
    meta = {
        "source": "synthetic", "kind": kind, "seed": seed, "zipf_s": zipf_s if kind == "zipf" else None,
        "tokens_per_worker": tokens_per_worker,
    }  # fmt: skip
    if kind == "drift":
        meta.update(hot_experts=hot_experts, hot_fraction=hot_fraction, drift_per_step=drift_per_step)
    return RoutingTrace(out, top_k, micro_batches, meta)
