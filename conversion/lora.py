"""Merging PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``) into a base.

For every adapted linear layer ``W [out, in]``: ``W' = W + s * B @ A`` with ``A [r, in]``,
``B [out, r]`` and ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA), where ``r`` and
``lora_alpha`` may be overridden per module by ``rank_pattern`` / ``alpha_pattern`` exactly as PEFT
resolves them. The merge is computed in float32 and cast once to the base dtype. The adapter file
is the source of truth for which modules are adapted: every tensor in it must be consumed, and
anything we do not implement (DoRA, LoRA on embeddings, modules_to_save, ...) is an error naming
the adapter file and the setting or tensor.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hcnr_jax.errors import CheckpointError
from hcnr_jax.params import Params, flatten, set_leaves

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# adapter_config.json settings that change the merge and that we do not implement: each must be
# absent or falsy.
UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "layer_replication",
    "use_qalora",
    "target_parameters",
    "megatron_config",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
)

# <module>.lora_A.weight, optionally with the adapter name (<module>.lora_A.default.weight).
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# Biases trained with bias="lora_only"/"all" (PEFT >= 0.14 saves them under base_layer).
_BIAS_KEY = re.compile(r"^(?P<module>.+?)(?:\.base_layer)?\.bias$")
# Whole base weights PEFT saves alongside the adapter (save_embedding_layers: lm_head or
# embed_tokens in target_modules); loading the adapter restores them before the LoRA delta.
_BASE_KEY = re.compile(r"^(?P<module>.+?)(?:\.base_layer)?\.weight$")


def lora_delta(a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """``scaling * B @ A`` in float32: ``a [r, in]``, ``b [out, r]`` -> ``[out, in]``."""
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return scaling * jnp.matmul(b32, a32, precision=jax.lax.Precision.HIGHEST)


def merge_weight(w: jax.Array, a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """``W + scaling * B @ A`` computed in float32, cast once to ``w``'s dtype."""
    return (jnp.asarray(w, jnp.float32) + lora_delta(a, b, scaling)).astype(w.dtype)


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern key matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(config: dict[str, Any], module: str) -> tuple[int, float]:
    """``(r, scaling)`` of ``module`` (HF module name, e.g. ``model.layers.0.self_attn.q_proj``)."""
    r = int(pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    return r, (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json, checked for settings we cannot merge."""
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {adapter_dir} a PEFT adapter directory?)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type={config.get('peft_type')!r}; only LORA adapters are supported")
    for key in UNSUPPORTED:
        if config.get(key):
            raise CheckpointError(f"{path}: unsupported setting {key}={config[key]!r}")
    if config.get("bias", "none") not in ("none", "lora_only", "all"):
        raise CheckpointError(f"{path}: unsupported setting bias={config.get('bias')!r}")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise CheckpointError(f"{path}: {key} must be a positive number, got {config.get(key)!r}")
    if config.get("fan_in_fan_out"):
        # PEFT itself resets fan_in_fan_out for torch.nn.Linear targets (every layer we adapt),
        # so the stored B @ A is already [out, in].
        log.info("%s: fan_in_fan_out=True ignored for Linear layers, as PEFT does", path)
    return config


def read_adapter_tensors(adapter_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of adapter_model.safetensors, names without PEFT's ``base_model.model.``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        extra = " (adapter_model.bin is not supported; re-save with safe_serialization)" if (
            adapter_dir / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{path}: not found{extra}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
    out = {}
    for name, t in tensors.items():
        if not name.startswith(PREFIX):
            raise CheckpointError(f"{path}: tensor {name} does not start with {PREFIX!r}")
        out[name[len(PREFIX):]] = t
    return out


def merge_lora(base: Any, adapter_dir: Path) -> Any:
    """``base`` (a ``Pretrained``) with the LoRA adapter in ``adapter_dir`` merged into its weights."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    tensors = read_adapter_tensors(adapter_dir)
    path = adapter_dir / WEIGHTS_NAME
    flat = flatten(base.params)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    updates: dict[str, Any] = {}
    for name, t in tensors.items():
        m = _LORA_KEY.match(name)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = t
            continue
        m = _BIAS_KEY.match(name)
        if m and config.get("bias", "none") != "none":
            target = m["module"] + ".bias"
            if target not in flat:
                raise CheckpointError(f"{path}: tensor {name}: the base model has no {target}")
            if tuple(t.shape) != tuple(flat[target].shape):
                raise CheckpointError(f"{path}: tensor {name} has shape {tuple(t.shape)}, "
                                      f"base {target} has {tuple(flat[target].shape)}")
            updates[target] = jnp.asarray(t.astype(np.float32)).astype(flat[target].dtype)
            continue
        m = _BASE_KEY.match(name)
        if m and m["module"] in ("lm_head", "model.embed_tokens"):
            target = m["module"] + ".weight"
            if target not in flat or tuple(t.shape) != tuple(flat[target].shape):
                raise CheckpointError(f"{path}: tensor {name} has shape {tuple(t.shape)}, base {target} has "
                                      f"{tuple(flat[target].shape) if target in flat else 'no such tensor'}")
            updates[target] = jnp.asarray(t.astype(np.float32)).astype(flat[target].dtype)
            continue
        raise CheckpointError(f"{path}: unsupported tensor {name} (only lora_A/lora_B of linear layers "
                              "and biases are supported)")
    if not pairs:
        raise CheckpointError(f"{path}: no lora_A/lora_B tensors")
    for module, ab in sorted(pairs.items()):
        for part in ("A", "B"):
            if part not in ab:
                raise CheckpointError(f"{path}: {module}.lora_{part}.weight is missing")
        target = module + ".weight"
        if target == "lm_head.weight" and base.config.tie_word_embeddings:
            raise CheckpointError(f"{path}: LoRA on lm_head of a model with tied embeddings is not supported")
        w = updates.get(target, flat.get(target))
        if w is None or w.ndim != 2 or target == "model.embed_tokens.weight":
            raise CheckpointError(f"{path}: tensor {module}.lora_A.weight targets {module}, "
                                  "which is not a linear layer of the base model")
        a, b = ab["A"], ab["B"]
        r, scaling = lora_scaling(config, module)
        out_dim, in_dim = w.shape
        if a.shape != (r, in_dim) or b.shape != (out_dim, r):
            raise CheckpointError(
                f"{path}: tensor {module}.lora_A.weight/lora_B.weight have shapes {tuple(a.shape)}/"
                f"{tuple(b.shape)}, expected ({r}, {in_dim})/({out_dim}, {r}) for {target} with r={r}"
            )
        updates[target] = merge_weight(w, a, b, scaling)
    params: Params = set_leaves(base.params, updates)
    log.info("merged %d LoRA modules from %s", len(pairs), adapter_dir)
    return base.replace(params=params, source=f"{base.source}+{adapter_dir}")
