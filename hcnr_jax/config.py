"""Model configuration: one frozen dataclass for every supported family, built from a HF config.

The dataclass is hashable so that it can be a static argument of `jax.jit`. Everything the
forward pass needs is resolved here once (head_dim, per-layer sliding windows, RoPE parameters),
so the model code has no family-specific branches beyond the feature flags below.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hcnr_jax.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """What distinguishes one architecture family. Each entry is a function of the raw HF config."""

    qkv_bias: Callable[[Mapping[str, Any]], bool]
    o_bias: Callable[[Mapping[str, Any]], bool]
    mlp_bias: Callable[[Mapping[str, Any]], bool]
    qk_norm: bool
    # Gemma-style features (all off for the Llama-like families):
    activation: str = "silu"  # the MLP gate's hidden_act / hidden_activation
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w), in float32 before the cast back
    sandwich_norms: bool = False  # norms after attention/MLP too (pre_ and post_feedforward_layernorm)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size)
    local_rope: bool = False  # sliding-window layers have their own RoPE (rope_local_base_freq)
    sliding_pattern: bool = False  # without layer_types, every `sliding_window_pattern`-th layer is global
    tie_default: bool = False  # tie_word_embeddings when config.json leaves it out
    default_rope_theta: float = 10000.0
    default_query_pre_attn_scalar: float | None = None  # None: attention scale head_dim ** -0.5


# The per-family table. Adding a Llama-like family is one line here (and its tests).
FAMILIES: dict[str, Family] = {
    "llama": Family(
        qkv_bias=lambda c: bool(c.get("attention_bias", False)),
        o_bias=lambda c: bool(c.get("attention_bias", False)),
        mlp_bias=lambda c: bool(c.get("mlp_bias", False)),
        qk_norm=False,
    ),
    "qwen2": Family(
        qkv_bias=lambda c: True,
        o_bias=lambda c: False,
        mlp_bias=lambda c: False,
        qk_norm=False,
    ),
    "qwen3": Family(
        qkv_bias=lambda c: bool(c.get("attention_bias", False)),
        o_bias=lambda c: bool(c.get("attention_bias", False)),
        mlp_bias=lambda c: False,
        qk_norm=True,
    ),
    "mistral": Family(
        qkv_bias=lambda c: False,
        o_bias=lambda c: False,
        mlp_bias=lambda c: False,
        qk_norm=False,
    ),
    # Gemma 3 text (Gemma3ForCausalLM; also the text part of the multimodal checkpoints' weights).
    "gemma3_text": Family(
        qkv_bias=lambda c: bool(c.get("attention_bias", False)),
        o_bias=lambda c: bool(c.get("attention_bias", False)),
        mlp_bias=lambda c: False,
        qk_norm=True,
        activation="gelu_pytorch_tanh",
        norm_plus_one=True,
        sandwich_norms=True,
        embed_scale=True,
        local_rope=True,
        sliding_pattern=True,
        tie_default=True,
        default_rope_theta=1_000_000.0,
        default_query_pre_attn_scalar=256.0,
    ),
}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    """Resolved architecture of a decoder-only transformer (Llama, Qwen2, Qwen3, Mistral, Gemma 3).

    `sliding_windows[i]` is the attention window of layer i (None: full causal attention); a key at
    sequence index s is visible from query index t when t - window < s <= t, as in transformers.
    `rope` holds the resolved RoPE parameters as sorted (key, value) pairs to stay hashable; they
    apply to every layer but, when `local_rope_theta` is set, the sliding-window ones, which use
    default RoPE with that base (Gemma 3). The fields after `sliding_windows` default to Llama's math.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    rope: tuple[tuple[str, Any], ...]
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]
    hidden_act: str = "silu"
    norm_plus_one: bool = False
    sandwich_norms: bool = False
    embed_scale: bool = False
    local_rope_theta: float | None = None
    query_pre_attn_scalar: float | None = None  # attention scale is its -0.5 power (None: head_dim's)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def rope_params(self) -> dict[str, Any]:
        return dict(self.rope)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _rope_parameters(hf: Mapping[str, Any], family: Family, source: str) -> tuple[dict[str, Any], float | None]:
    """(RoPE parameters of the global layers, RoPE base of the sliding layers or None).

    Both spellings: transformers>=5 `rope_parameters` (per layer type for Gemma 3:
    ``{"full_attention": {...}, "sliding_attention": {...}}``), older `rope_theta` + `rope_scaling`
    (+ `rope_local_base_freq`).
    """
    params = hf.get("rope_parameters")
    local: Mapping[str, Any] | None = None
    if isinstance(params, Mapping) and params and all(isinstance(v, Mapping) for v in params.values()):
        if not family.local_rope or set(params) - {"full_attention", "sliding_attention"}:
            raise CheckpointError(f"{source}: per-layer-type rope_parameters {sorted(params)} are not supported "
                                  f"for model_type={hf.get('model_type')!r}")
        params, local = params.get("full_attention") or {}, params.get("sliding_attention")
    default_theta = hf.get("rope_theta", family.default_rope_theta)
    out: dict[str, Any] = {}
    if params:
        out.update(params)
    else:
        out["rope_theta"] = default_theta
        scaling = hf.get("rope_scaling") or {}
        out.update(scaling)
    rope_type = out.pop("rope_type", None) or out.pop("type", None) or "default"
    out["rope_type"] = rope_type
    out.setdefault("rope_theta", default_theta)
    if not family.local_rope:
        return out, None
    local = dict(local or {"rope_theta": hf.get("rope_local_base_freq", 10000.0)})
    if (local.get("rope_type") or local.get("type") or "default") != "default":
        raise CheckpointError(f"{source}: unsupported RoPE type {local.get('rope_type')!r} on sliding layers")
    return out, float(local.get("rope_theta", 10000.0))


def _layer_windows(hf: Mapping[str, Any], model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types is None and FAMILIES[model_type].sliding_pattern:
        # Gemma 3's default: layers 1..pattern-1 of every `pattern` slide, the last one is global.
        pattern = int(hf.get("sliding_window_pattern") or 6)
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise CheckpointError(
                f"config.json: layer_types has {len(layer_types)} entries for {num_layers} layers"
            )
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise CheckpointError(f"config.json: unsupported layer_types {sorted(unknown)}")
        if "sliding_attention" in layer_types and not window:
            raise CheckpointError("config.json: sliding_attention layers but no sliding_window")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if model_type == "mistral":
        return (window,) * num_layers
    if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window") and window:
        first = hf.get("max_window_layers", num_layers)
        return tuple(window if i >= first else None for i in range(num_layers))
    return (None,) * num_layers


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a `ModelConfig` from a HF config dict (config.json contents).

    Settings that would change the math but that we do not implement are rejected with an error
    naming the field, never silently ignored.
    """
    from hcnr_jax.schema import check_config, expect_object

    model_type = expect_object(hf, source).get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{source}: unsupported architecture model_type={model_type!r} "
            f"(architectures={hf.get('architectures')}); supported: {sorted(FAMILIES)}"
        )
    family = FAMILIES[model_type]
    check_config(hf, source)  # every known field's type and range, before anything reads one

    def need(key: str) -> Any:
        if hf.get(key) is None:
            raise CheckpointError(f"{source}: missing required field {key!r}")
        return hf[key]

    checks = {
        "hidden_act": lambda v: v in (None, family.activation),
        "hidden_activation": lambda v: v in (None, family.activation),
        "pretraining_tp": lambda v: v in (None, 1),
        "partial_rotary_factor": lambda v: v in (None, 1, 1.0),
        "use_bidirectional_attention": lambda v: not v,
    }
    for key, ok in checks.items():
        if not ok(hf.get(key)):
            raise CheckpointError(f"{source}: unsupported setting {key}={hf.get(key)!r}")

    if hf.get("attn_logit_softcapping") is not None:
        # Gemma 3 keeps the field from Gemma 2 but neither transformers' Gemma3Attention nor llama.cpp
        # applies it (qk norms replaced it): follow them, and say so.
        log.warning("%s: attn_logit_softcapping=%s is ignored, as transformers' %s model ignores it",
                    source, hf["attn_logit_softcapping"], model_type)
    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    num_layers = int(need("num_hidden_layers"))
    head_dim = hf.get("head_dim") or hidden // heads
    rope, local_theta = _rope_parameters(hf, family, source)
    rope_type = rope.pop("rope_type")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{source}: unsupported RoPE type {rope_type!r}; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    rope_theta = float(rope.pop("rope_theta"))
    rope.pop("partial_rotary_factor", None)
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_type=rope_type,
        rope=tuple(sorted((k, v) for k, v in rope.items() if not isinstance(v, (list, dict)))),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", family.tie_default)),
        qkv_bias=family.qkv_bias(hf),
        o_bias=family.o_bias(hf),
        mlp_bias=family.mlp_bias(hf),
        qk_norm=family.qk_norm,
        sliding_windows=_layer_windows(hf, model_type, num_layers),
        hidden_act=family.activation,
        norm_plus_one=family.norm_plus_one,
        sandwich_norms=family.sandwich_norms,
        embed_scale=family.embed_scale,
        local_rope_theta=local_theta,
        query_pre_attn_scalar=_optional_float(hf, "query_pre_attn_scalar", family.default_query_pre_attn_scalar),
        final_logit_softcapping=_optional_float(hf, "final_logit_softcapping"),
    )


def _optional_float(hf: Mapping[str, Any], key: str, default: float | None = None) -> float | None:
    value = hf.get(key, default)
    return None if value is None else float(value)
