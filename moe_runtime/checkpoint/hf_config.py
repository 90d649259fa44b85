"""`config.json` of an HF-layout Yuan 2.0-M32 checkpoint <-> ModelConfig.

The keys are the ones the official modelling code reads (IEIT-Yuan/Yuan2.0-M32 `yuan_moe_hf_model.py`, `YuanConfig`;
see shared yuan-m32.md, "The released checkpoint"). What this runtime cannot compute the same way is an error naming
the key, its value and what is supported; nothing is silently reinterpreted.

Derived fields, as the HF classes derive them:
- head_dim = attention_projection_size / num_attention_heads (hidden_size / heads when the key is absent);
- rotary_dim = hidden_size // heads when head_dim != hidden_size // heads, else head_dim (`YuanAttention`);
- rope_base = 10000: `YuanRotaryEmbedding` never receives a base from the config. This runtime writes and reads an
  extra `rotary_base` key when its base differs (a long-context fine-tune), which the HF code ignores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moe_runtime.config import PRESETS, ModelConfig

HF_ROPE_BASE = 10000.0  # the HF class's default base, the only one it uses
LFA_NORM_EPS = 1e-6  # LocalizedFiltering's own RMSNorm is built with the default eps, whatever rms_norm_eps says

# Keys of config.json this module reads; every other key is carried along (export keeps it) and listed as ignored.
_READ_KEYS = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "attention_projection_size", "vocab_size",
    "max_position_embeddings", "rms_norm_eps", "hidden_act", "use_shareqk", "causal_mask", "reset_attention_mask",
    "reset_position_ids", "eod_token", "sep_token", "pad_token_id", "tie_word_embeddings", "moe_config",
    "rotary_base", "initializer_range",
})
# Read but without effect on the numbers: the flash and eager paths compute the same attention.
_NO_EFFECT_KEYS = frozenset({"use_flash_attention"})
_MOE_KEYS = ("moe_num_experts", "moe_top_k", "norm_topk_prob", "ffn_hidden_size", "gated_linear_unit")

# ModelConfig fields a checkpoint fixes (its architecture); the rest are choices of the run.
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "rotary_dim", "num_experts", "top_k",
    "ffn_hidden_size", "router", "norm_eps", "lfa",
)


class CheckpointError(ValueError):
    """An unusable checkpoint; the message names the file, the key or tensor, the value and what was expected."""


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids config.json carries: end of document, separator (prompt | answer), padding."""

    eod: int
    sep: int
    pad: int


@dataclass(frozen=True)
class HFModelInfo:
    """What config.json says: the model, its special tokens, its document-boundary behaviour, the keys not read."""

    model: ModelConfig
    tokens: SpecialTokens | None  # None when config.json names none of them
    reset_attention_mask: bool  # official: attention restarts after each eod token
    reset_position_ids: bool
    ignored_keys: tuple[str, ...]
    raw: Mapping[str, Any]  # the file as read, kept so an export writes the unread keys back


def _err(source: str, key: str, value: Any, expected: str) -> CheckpointError:
    return CheckpointError(f"{source}: {key} = {value!r}: {expected}")


def _positive_int(container: Mapping[str, Any], key: str, source: str, prefix: str = "") -> int:
    if key not in container:
        raise CheckpointError(f"{source}: required key {prefix}{key} is missing")
    value = container[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _err(source, f"{prefix}{key}", value, "expected a positive integer")
    return value


def _flag(container: Mapping[str, Any], key: str, default: bool, supported: bool | None, source: str,
          why: str = "", prefix: str = "") -> bool:
    value = container.get(key, default)
    if not isinstance(value, bool):
        raise _err(source, f"{prefix}{key}", value, "expected true or false")
    if supported is not None and value != supported:
        raise _err(source, f"{prefix}{key}", value, f"only {str(supported).lower()} is supported{why}")
    return value


def _optional_token(hf: Mapping[str, Any], key: str, source: str) -> int | None:
    value = hf.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _err(source, key, value, "expected a token id (integer >= 0)")
    return value


def parse_hf_config(hf: Mapping[str, Any], source: str = "config.json", **overrides: Any) -> HFModelInfo:
    """config.json (as a dict) -> HFModelInfo. `overrides` set the run's own ModelConfig fields (rope, max_seq_len,
    rope_base, init_std, aux_loss_coeff, checkpoint); architecture fields come from the file only."""
    if not isinstance(hf, Mapping):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    moe = hf.get("moe_config")
    if not isinstance(moe, Mapping):
        raise _err(source, "moe_config", moe, f"expected an object with keys {list(_MOE_KEYS)} "
                   "(a model without experts is not supported)")
    hidden = _positive_int(hf, "hidden_size", source)
    heads = _positive_int(hf, "num_attention_heads", source)
    layers = _positive_int(hf, "num_hidden_layers", source)
    vocab = _positive_int(hf, "vocab_size", source)
    max_pos = _positive_int(hf, "max_position_embeddings", source)
    experts = _positive_int(moe, "moe_num_experts", source, "moe_config.")
    top_k = _positive_int(moe, "moe_top_k", source, "moe_config.")
    ffn = _positive_int(moe, "ffn_hidden_size", source, "moe_config.")
    for key in ("norm_topk_prob", "gated_linear_unit"):  # the HF code indexes both directly
        if key not in moe:
            raise CheckpointError(f"{source}: required key moe_config.{key} is missing")
    _flag(moe, "gated_linear_unit", True, True, source, " (experts are SwiGLU: w1 gives 2 x ffn_hidden_size)",
          "moe_config.")
    _flag(moe, "norm_topk_prob", True, True, source, " (gates are renormalised over the top-k experts)",
          "moe_config.")
    _flag(hf, "use_shareqk", False, False, source, " (true selects the shared-QK attention without LFA)")
    _flag(hf, "tie_word_embeddings", True, True, source, " (the LM head is the input embedding)")
    _flag(hf, "causal_mask", True, True, source, " (causal attention)")
    reset_mask = _flag(hf, "reset_attention_mask", False, None, source)
    reset_pos = _flag(hf, "reset_position_ids", False, None, source)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _err(source, "hidden_act", act, "only 'silu' is supported (SwiGLU experts)")
    if top_k > experts:
        raise _err(source, "moe_config.moe_top_k", top_k, f"must be <= moe_config.moe_num_experts ({experts})")

    proj = hf.get("attention_projection_size")
    if proj is None:
        proj = hidden
    if isinstance(proj, bool) or not isinstance(proj, int) or proj <= 0 or proj % heads:
        raise _err(source, "attention_projection_size", proj,
                   f"expected a positive multiple of num_attention_heads ({heads})")
    head_dim = proj // heads
    rotary_dim = hidden // heads if head_dim != hidden // heads else head_dim
    if rotary_dim > head_dim or rotary_dim % 2:
        raise _err(source, "attention_projection_size", proj,
                   f"the HF rotary embedding turns hidden_size // heads = {rotary_dim} channels of each head, "
                   f"which must be even and <= head_dim ({head_dim})")
    eps = hf.get("rms_norm_eps", LFA_NORM_EPS)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or float(eps) != LFA_NORM_EPS:
        raise _err(source, "rms_norm_eps", eps,
                   f"only {LFA_NORM_EPS:g} is supported (the LFA filter's norm is fixed at {LFA_NORM_EPS:g} in the "
                   "official code and this model uses one eps for every norm)")
    base = hf.get("rotary_base", HF_ROPE_BASE)
    if isinstance(base, bool) or not isinstance(base, (int, float)) or base <= 0:
        raise _err(source, "rotary_base", base, "expected a positive number")

    fields: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, head_dim=head_dim,
        rotary_dim=rotary_dim, rope_base=float(base), num_experts=experts, top_k=top_k, ffn_hidden_size=ffn,
        router="attention", aux_loss_coeff=0.0, norm_eps=LFA_NORM_EPS, max_seq_len=max_pos, lfa=True,
    )
    std = hf.get("initializer_range")
    if isinstance(std, (int, float)) and not isinstance(std, bool) and std > 0:
        fields["init_std"] = float(std)
    bad = sorted(set(overrides) & set(ARCHITECTURE_FIELDS))
    if bad:
        raise CheckpointError(f"{source}: {bad[0]} is fixed by the checkpoint; it cannot be overridden")
    try:
        model = ModelConfig(**{**fields, **overrides})
    except ValueError as err:
        raise CheckpointError(f"{source}: does not give a valid model: {err}") from None

    ids = {k: _optional_token(hf, k, source) for k in ("eod_token", "sep_token", "pad_token_id")}
    for key, value in ids.items():
        if value is not None and value >= vocab:
            raise _err(source, key, value, f"must be < vocab_size ({vocab})")
    tokens = None
    if ids["eod_token"] is not None:
        eod = ids["eod_token"]
        tokens = SpecialTokens(eod=eod, sep=ids["sep_token"] if ids["sep_token"] is not None else eod,
                               pad=ids["pad_token_id"] if ids["pad_token_id"] is not None else eod)
    ignored = tuple(sorted(set(hf) - _READ_KEYS - _NO_EFFECT_KEYS))
    return HFModelInfo(model, tokens, reset_mask, reset_pos, ignored, dict(hf))


def model_config_from_hf(hf: Mapping[str, Any], source: str = "config.json", **overrides: Any) -> ModelConfig:
    return parse_hf_config(hf, source, **overrides).model


def hf_config_from_model(
    cfg: ModelConfig,
    base: Mapping[str, Any] | None = None,
    tokens: SpecialTokens | None = None,
    *,
    reset_attention_mask: bool | None = None,
    reset_position_ids: bool | None = None,
    torch_dtype: str = "bfloat16",
) -> dict[str, Any]:
    """ModelConfig -> config.json for the official HF classes. `base` (the imported checkpoint's config.json) keeps
    every key this runtime does not own; tokens and the reset flags default to base's, else to no reset (this
    runtime's model does not restart attention at a document boundary)."""
    if not cfg.lfa or cfg.router != "attention":
        raise CheckpointError(f"model.lfa = {cfg.lfa}, model.router = {cfg.router!r}: the HF layout has LFA "
                              "attention and the attention router only")
    hf_rotary = cfg.hidden_size // cfg.num_heads
    expected_rotary = hf_rotary if cfg.head_dim != hf_rotary else cfg.head_dim
    if cfg.rotary_dim != expected_rotary:
        raise CheckpointError(f"model.rotary_dim = {cfg.rotary_dim}: the HF class rotates {expected_rotary} channels "
                              f"per head (hidden_size // num_heads = {hf_rotary}, head_dim = {cfg.head_dim})")
    if cfg.norm_eps != LFA_NORM_EPS:
        raise CheckpointError(f"model.norm_eps = {cfg.norm_eps:g}: the HF LFA filter's norm uses {LFA_NORM_EPS:g}")
    out: dict[str, Any] = dict(base or {})
    base_moe = out.get("moe_config") if isinstance(out.get("moe_config"), Mapping) else {}
    if tokens is None and "eod_token" not in out:
        raise CheckpointError("config.json needs eod_token, sep_token and pad_token_id: pass tokens (or a base "
                              "config that has them)")
    out.update(
        architectures=out.get("architectures", ["YuanForCausalLM"]), model_type=out.get("model_type", "yuan"),
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        attention_projection_size=cfg.attn_width, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu", use_shareqk=False,
        use_flash_attention=out.get("use_flash_attention", False), causal_mask=True, tie_word_embeddings=True,
        initializer_range=cfg.init_std, torch_dtype=torch_dtype,
        moe_config={**base_moe, "moe_num_experts": cfg.num_experts, "moe_top_k": cfg.top_k, "norm_topk_prob": True,
                    "ffn_hidden_size": cfg.ffn_hidden_size, "gated_linear_unit": True},
    )
    for key, flag in (("reset_attention_mask", reset_attention_mask), ("reset_position_ids", reset_position_ids)):
        out[key] = flag if flag is not None else out.get(key, False)
    if tokens is not None:
        out.update(eod_token=tokens.eod, sep_token=tokens.sep, pad_token_id=tokens.pad)
    if cfg.rope_base != HF_ROPE_BASE:
        out["rotary_base"] = cfg.rope_base
    else:
        out.pop("rotary_base", None)
    return out


def merge_model_config(checkpoint_cfg: ModelConfig, user: Mapping[str, Any], source: str,
                       checkpoint_source: str) -> ModelConfig:
    """The model of a run that names a checkpoint: the checkpoint's architecture plus the run's own fields from
    `user` (a config file's `model:` section, preset expanded). A user value that contradicts the checkpoint is an
    error naming both values and both files."""
    user = dict(user)
    preset = user.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise CheckpointError(f"{source}: model.preset = {preset!r}: expected one of {sorted(PRESETS)}")
        user = {**PRESETS[preset], **user}
    for key in ARCHITECTURE_FIELDS:
        if key in user and user[key] != getattr(checkpoint_cfg, key):
            raise CheckpointError(
                f"{source}: model.{key} = {user[key]!r} contradicts {key} = {getattr(checkpoint_cfg, key)!r} of "
                f"the checkpoint ({checkpoint_source})"
            )
    own = {k: v for k, v in user.items() if k not in ARCHITECTURE_FIELDS}
    unknown = sorted(set(own) - set(ModelConfig.model_fields))
    if unknown:
        raise CheckpointError(f"{source}: model.{unknown[0]} = {own[unknown[0]]!r}: unknown key")
    try:
        return ModelConfig(**{**checkpoint_cfg.model_dump(), **own})
    except ValueError as err:
        raise CheckpointError(f"{source}: invalid model settings with checkpoint {checkpoint_source}: {err}") from None
