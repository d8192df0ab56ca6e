"""Merging PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``) into a base,
and writing them (``write_adapter``).

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
import ml_dtypes
import numpy as np

from hcnr_jax.errors import CheckpointError
from hcnr_jax.io import atomic_output_dir
from hcnr_jax.params import Params, flatten, set_leaves
from hcnr_jax.precision import HIGHEST

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
    return scaling * jnp.matmul(b32, a32, precision=HIGHEST)


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
    from hcnr_jax.schema import check_adapter_config, read_json_object

    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {adapter_dir} a PEFT adapter directory?)")
    config = check_adapter_config(read_json_object(path), str(path))
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
        if t.dtype.kind == "f" or t.dtype == ml_dtypes.bfloat16:
            bad = int(t.size - np.count_nonzero(np.isfinite(t)))
            if bad:
                raise CheckpointError(f"{path}: tensor {name} holds {bad} NaN or infinite value(s); "
                                      "refusing to merge it (the adapter is damaged or its training diverged)")
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
        merged = merge_weight(w, a, b, scaling)
        if not bool(jnp.all(jnp.isfinite(merged))) and bool(jnp.all(jnp.isfinite(w))):
            raise CheckpointError(f"{path}: merging {module}.lora_A/lora_B into {target} overflows "
                                  f"{np.dtype(w.dtype).name} (load the base in float32)")
        updates[target] = merged
    params: Params = set_leaves(base.params, updates)
    log.info("merged %d LoRA modules from %s", len(pairs), adapter_dir)
    return base.replace(params=params, source=f"{base.source}+{adapter_dir}")


# --- Writing adapters ---------------------------------------------------------------------------

# Modules an adapter may target: the block linear layers and the (untied) LM head.
_WRITABLE_MODULE = re.compile(
    r"^(?:model\.layers\.(?P<layer>\d+)\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)|lm_head)$")
_FLOAT_DTYPES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64), np.dtype(ml_dtypes.bfloat16)}


def _as_float_array(x: Any, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype not in _FLOAT_DTYPES:
        if np.issubdtype(arr.dtype, np.number) and not np.issubdtype(arr.dtype, np.complexfloating):
            arr = arr.astype(np.float32)
        else:
            raise CheckpointError(f"LoRA adapter: {what} has dtype {arr.dtype}; expected a float array")
    return np.ascontiguousarray(arr)


def _default_target_modules(modules: list[str]) -> tuple[list[str], list[int] | None]:
    """``(target_modules, layers_to_transform)`` under which PEFT creates exactly ``modules``.

    Short names (``q_proj``) with the layer indices when every short name is adapted in the same
    layers (the writer cannot know the model's depth, so the indices are always given); otherwise
    the full module names, which PEFT matches exactly."""
    layers: dict[str, set[int]] = {}
    for m in modules:
        match = _WRITABLE_MODULE.match(m)
        if match is None or match["layer"] is None:  # lm_head: no layer index, list names
            return sorted(modules), None
        layers.setdefault(m.rsplit(".", 1)[1], set()).add(int(match["layer"]))
    shared = next(iter(layers.values()))
    if all(v == shared for v in layers.values()):
        return sorted(layers), sorted(shared)
    return sorted(modules), None


def _check_adapter_settings(r: int, alpha: float, lora: dict[str, Any], extra_files: dict[str, str] | None) -> None:
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0:
        raise CheckpointError(f"LoRA adapter: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float, np.number)) or not math.isfinite(alpha) or alpha <= 0:
        raise CheckpointError(f"LoRA adapter: alpha must be a positive number, got {alpha!r}")
    if not lora:
        raise CheckpointError("LoRA adapter: no modules to write")
    for name in extra_files or {}:
        if name in (CONFIG_NAME, WEIGHTS_NAME) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"LoRA adapter: extra file name {name!r} must be a plain file name other than "
                                  f"{CONFIG_NAME} and {WEIGHTS_NAME}")


def _adapter_tensors(lora: dict[str, tuple[Any, Any]], r: int) -> dict[str, np.ndarray]:
    """PEFT's tensors ``base_model.model.<module>.lora_A/B.weight`` of ``lora``, each pair checked
    (a linear layer's module name, A ``[r, in]``, B ``[out, r]``, finite)."""
    tensors: dict[str, np.ndarray] = {}
    for module, pair in sorted(lora.items()):
        if not isinstance(module, str) or not _WRITABLE_MODULE.match(module):
            raise CheckpointError(
                f"LoRA adapter: unknown module {module!r}; expected a linear layer's HF module name such as "
                "model.layers.0.self_attn.q_proj, model.layers.0.mlp.down_proj or lm_head")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise CheckpointError(f"LoRA adapter: module {module}: expected a pair (A, B)")
        a = _as_float_array(pair[0], f"module {module} A")
        b = _as_float_array(pair[1], f"module {module} B")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(f"LoRA adapter: module {module}: A/B have shapes {a.shape}/{b.shape}, "
                                  f"expected ({r}, in)/(out, {r}) with r={r}")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise CheckpointError(f"LoRA adapter: module {module}: A or B holds NaN or infinite values")
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b
    return tensors


def _targets(modules: list[str], target_modules: list[str] | str | None) -> tuple[list[str] | str, list[int] | None]:
    """``(target_modules, layers_to_transform)`` of the config: the defaults of
    `_default_target_modules`, or the given ones, checked to match every module as PEFT matches."""
    if target_modules is None:
        return _default_target_modules(modules)
    # PEFT's matching: a string is a regex matching the whole name; a list entry matches the
    # name or a dotted suffix of it.
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    for module in modules:
        if not (re.fullmatch(target_modules, module) if isinstance(target_modules, str) else
                any(module == t or module.endswith("." + t) for t in target_modules)):
            raise CheckpointError(f"LoRA adapter: module {module} is not matched by target_modules="
                                  f"{target_modules}; PEFT would not load its weights")
    return target_modules, None


def _adapter_config(r: int, alpha: float, base_model: str, target_modules: list[str] | str,
                    layers_to_transform: list[int] | None) -> dict[str, Any]:
    """adapter_config.json: PEFT's LoRA settings for an inference-only adapter."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "revision": None,
        "r": int(r),
        "lora_alpha": float(alpha) if not float(alpha).is_integer() else int(alpha),
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "layers_to_transform": layers_to_transform,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
        "init_lora_weights": True,
    }


def write_adapter(
    out_dir: str | Path,
    lora: dict[str, tuple[Any, Any]],
    *,
    r: int,
    alpha: float,
    base_model: str = "",
    target_modules: list[str] | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``lora`` maps HF module names (``model.layers.0.self_attn.q_proj``; ``lm_head``) to
    ``(A [r, in], B [out, r])``: the layer computes ``W + (alpha / r) * B @ A``. Tensors keep their
    dtype (float32, bfloat16, float16; other numbers become float32) and are stored as
    ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``. ``target_modules`` defaults to
    the short names of the modules (with ``layers_to_transform`` when they cover the same layers,
    else the full module names), so that PEFT creates exactly these LoRA layers. The directory
    appears whole or not at all; it loads with ``peft.PeftModel.from_pretrained`` and with
    ``load_pretrained("BASE+DIR")``. ``extra_files``: name -> text written beside the adapter
    (reports). Bad input is a ``CheckpointError`` naming the module.
    """
    _check_adapter_settings(r, alpha, lora, extra_files)
    tensors = _adapter_tensors(lora, r)
    config = _adapter_config(r, alpha, base_model, *_targets(sorted(lora), target_modules))
    from safetensors.numpy import save_file

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out_dir)
