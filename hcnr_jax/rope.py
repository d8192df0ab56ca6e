"""Rotary position embeddings with a registry of the scaling types released checkpoints ship.

Inverse frequencies are computed in float32 exactly as transformers computes them, because RoPE
angles at long positions amplify any difference in the last bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from hcnr_jax.config import ModelConfig

# rope_type -> (inv_freq [head_dim/2] float32, attention scaling factor)
RopeInit = Callable[[ModelConfig, dict[str, Any]], tuple[np.ndarray, float]]
ROPE_INIT: dict[str, RopeInit] = {}


def register(name: str) -> Callable[[RopeInit], RopeInit]:
    def deco(fn: RopeInit) -> RopeInit:
        ROPE_INIT[name] = fn
        return fn

    return deco


def _base_inv_freq(cfg: ModelConfig, theta: float | None = None) -> np.ndarray:
    dim = cfg.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = cfg.rope_theta if theta is None else theta
    return (np.float32(1.0) / (np.float32(base) ** exponent)).astype(np.float32)


@register("default")
def _default(cfg: ModelConfig, p: dict[str, Any]) -> tuple[np.ndarray, float]:
    return _base_inv_freq(cfg), 1.0


@register("linear")
def _linear(cfg: ModelConfig, p: dict[str, Any]) -> tuple[np.ndarray, float]:
    return (_base_inv_freq(cfg) / np.float32(p["factor"])).astype(np.float32), 1.0


@register("llama3")
def _llama3(cfg: ModelConfig, p: dict[str, Any]) -> tuple[np.ndarray, float]:
    inv_freq = _base_inv_freq(cfg)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0


@register("yarn")
def _yarn(cfg: ModelConfig, p: dict[str, Any]) -> tuple[np.ndarray, float]:
    dim, base = cfg.head_dim, cfg.rope_theta
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or cfg.max_position_embeddings / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1).astype(np.float32)
    extra_factor = 1 - ramp
    inv_freq = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_tables(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim // 2] float32, attention_factor) for the config's RoPE type."""
    return ROPE_INIT[cfg.rope_type](cfg, cfg.rope_params)


def is_local(cfg: ModelConfig, layer: int) -> bool:
    """Whether ``layer`` uses the sliding layers' own RoPE (Gemma 3's rope_local_base_freq)."""
    return cfg.local_rope_theta is not None and cfg.sliding_windows[layer] is not None


def cos_sin(cfg: ModelConfig, positions: jnp.ndarray, local: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """positions [B, T] int -> cos, sin [B, T, head_dim] float32 (HF's half-split layout).
    ``local``: the sliding layers' default RoPE with base ``cfg.local_rope_theta`` (no scaling)."""
    inv_freq, scale = (_base_inv_freq(cfg, cfg.local_rope_theta), 1.0) if local else rope_tables(cfg)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [B, T, N, D]; cos/sin [B, T, D]. Rotates halves, as HF's ``rotate_half``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * c + rotated * s
