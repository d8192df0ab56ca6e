"""Model configuration: one frozen dataclass for every supported family, built from a HF config.

The dataclass is hashable so that it can be a static argument of `jax.jit`. Everything the
forward pass needs is resolved here once (head_dim, per-layer sliding windows, RoPE parameters),
so the model code has no family-specific branches beyond the feature flags below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hcnr_jax.errors import CheckpointError


@dataclass(frozen=True)
class Family:
    """What distinguishes one architecture family. Each entry is a function of the raw HF config."""

    qkv_bias: Callable[[Mapping[str, Any]], bool]
    o_bias: Callable[[Mapping[str, Any]], bool]
    mlp_bias: Callable[[Mapping[str, Any]], bool]
    qk_norm: bool


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
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    """Resolved architecture of a decoder-only transformer (Llama, Qwen2, Qwen3, Mistral).

    `sliding_windows[i]` is the attention window of layer i (None: full causal attention); a key at
    sequence index s is visible from query index t when t - window < s <= t, as in transformers.
    `rope` holds the resolved RoPE parameters as sorted (key, value) pairs to stay hashable.
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

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def rope_params(self) -> dict[str, Any]:
        return dict(self.rope)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Both spellings: transformers>=5 `rope_parameters`, older `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and params and all(isinstance(v, Mapping) for v in params.values()):
        raise CheckpointError("config.json: per-layer-type rope_parameters are not supported")
    out: dict[str, Any] = {}
    if params:
        out.update(params)
    else:
        out["rope_theta"] = hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling") or {}
        out.update(scaling)
    rope_type = out.pop("rope_type", None) or out.pop("type", None) or "default"
    out["rope_type"] = rope_type
    out.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return out


def _layer_windows(hf: Mapping[str, Any], model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
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
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{source}: unsupported architecture model_type={model_type!r} "
            f"(architectures={hf.get('architectures')}); supported: {sorted(FAMILIES)}"
        )
    family = FAMILIES[model_type]

    def need(key: str) -> Any:
        if hf.get(key) is None:
            raise CheckpointError(f"{source}: missing required field {key!r}")
        return hf[key]

    checks = {
        "hidden_act": lambda v: v in (None, "silu"),
        "pretraining_tp": lambda v: v in (None, 1),
        "partial_rotary_factor": lambda v: v in (None, 1, 1.0),
    }
    for key, ok in checks.items():
        if not ok(hf.get(key)):
            raise CheckpointError(f"{source}: unsupported setting {key}={hf.get(key)!r}")

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    num_layers = int(need("num_hidden_layers"))
    head_dim = hf.get("head_dim") or hidden // heads
    rope = _rope_parameters(hf)
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
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias(hf),
        o_bias=family.o_bias(hf),
        mlp_bias=family.mlp_bias(hf),
        qk_norm=family.qk_norm,
        sliding_windows=_layer_windows(hf, model_type, num_layers),
    )
