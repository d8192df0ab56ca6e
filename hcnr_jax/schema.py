"""One schema for the JSON files of a model: ``config.json``, ``tokenizer.json`` and
``adapter_config.json``.

Each known field has a type and a range; a value outside them is one `CheckpointError` naming the
file and the field (``m/config.json: field hidden_size is '576', expected an integer >= 1``),
raised before any weight is read, instead of a silent conversion (``int("576")``) or a TypeError
deep inside a run. Fields we do not know are left alone: every transformers and PEFT release adds
some (token ids, dtypes, training metadata), and the settings that would change the math without
our implementing them are rejected by name where they are read (`hcnr_jax.config.config_from_hf`,
`hcnr_jax.conversion.lora.read_adapter_config`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hcnr_jax.errors import CheckpointError

# A check returns None when the value is fine, else what was expected ("an integer >= 1").
Check = Callable[[Any], str | None]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def integer(minimum: int | None = 1) -> Check:
    what = "an integer" + ("" if minimum is None else f" >= {minimum}")
    return lambda v: None if _is_int(v) and (minimum is None or v >= minimum) else what


def number(low: float | None = 0.0, high: float | None = None, *, low_open: bool = True) -> Check:
    """A finite number in the range (``low``, ``high``] (``low_open=False``: [``low``, ``high``])."""
    bounds = ("" if low is None else f" {'>' if low_open else '>='} {low:g}") + (
        "" if high is None else f"{' and' if low is not None else ''} <= {high:g}")
    what = "a finite number" + bounds

    def check(v: Any) -> str | None:
        if not _is_number(v):
            return what
        if low is not None and (v <= low if low_open else v < low):
            return what
        return what if high is not None and v > high else None
    return check


def boolean() -> Check:
    return lambda v: None if isinstance(v, bool) else "true or false"


def string(choices: tuple[str, ...] | None = None) -> Check:
    what = "a string" if choices is None else f"one of {list(choices)}"
    return lambda v: None if isinstance(v, str) and (choices is None or v in choices) else what


def list_of(item: Check, what: str) -> Check:
    return lambda v: None if isinstance(v, list) and all(item(x) is None for x in v) else f"a list of {what}"


def either(*checks: Check) -> Check:
    def check(v: Any) -> str | None:
        failures = [c(v) for c in checks]
        return None if None in failures else " or ".join(f for f in failures if f)
    return check


def optional(check: Check) -> Check:
    """``check``, or JSON null (the field left at its default)."""
    def nullable(v: Any) -> str | None:
        return None if v is None else check(v)
    nullable.fields = getattr(check, "fields", None)  # type: ignore[attr-defined]
    return nullable


def obj(fields: Mapping[str, Check] | None = None) -> Check:
    """A JSON object; its known ``fields`` are checked by `check_fields` (nested names)."""
    def check(v: Any) -> str | None:
        return None if isinstance(v, Mapping) else "a JSON object"
    check.fields = fields  # type: ignore[attr-defined]
    return check


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_fields(values: Mapping[str, Any], fields: Mapping[str, Check], source: str, prefix: str = "") -> None:
    """Every known field of ``values`` checked; the first bad one is a `CheckpointError` naming
    ``source`` and the field (dotted for nested objects)."""
    for key, check in fields.items():
        if key not in values:
            continue
        value = values[key]
        expected = check(value)
        if expected is not None:
            raise CheckpointError(f"{source}: field {prefix}{key} is {_shown(value)}, expected {expected}")
        nested = getattr(check, "fields", None)
        if nested is not None and isinstance(value, Mapping):
            check_fields(value, nested, source, f"{prefix}{key}.")


def read_json_object(path: str | Path, what: str = "") -> dict[str, Any]:
    """The JSON object in the file at ``path``; a missing file, a file that is not UTF-8 JSON or
    one holding anything but an object is a `CheckpointError` naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found{what}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    return expect_object(value, str(path))


def expect_object(value: Any, source: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        raise CheckpointError(f"{source}: expected a JSON object of settings, got {kind}")
    return value


# --- config.json -----------------------------------------------------------------------------------

_POSITIVE = number()
# One RoPE parameter set (rope_scaling, rope_parameters or one of its per-layer-type entries).
ROPE_FIELDS: dict[str, Check] = {
    "rope_type": string(), "type": string(), "rope_theta": _POSITIVE, "factor": _POSITIVE,
    "original_max_position_embeddings": integer(1), "low_freq_factor": _POSITIVE, "high_freq_factor": _POSITIVE,
    "beta_fast": number(None), "beta_slow": number(None), "attention_factor": optional(_POSITIVE),
    "mscale": number(None), "mscale_all_dim": number(None), "truncate": boolean(),
    "partial_rotary_factor": number(0.0, 1.0),
}
_ROPE = obj(ROPE_FIELDS)
_TOKEN_IDS = optional(either(integer(None), list_of(integer(None), "integers")))

CONFIG_FIELDS: dict[str, Check] = {
    "model_type": string(),
    "architectures": optional(list_of(string(), "strings")),
    "vocab_size": integer(1),
    "hidden_size": integer(1),
    "intermediate_size": integer(1),
    "num_hidden_layers": integer(1),
    "num_attention_heads": integer(1),
    "num_key_value_heads": optional(integer(1)),
    "head_dim": optional(integer(1)),
    "max_position_embeddings": integer(1),
    "rms_norm_eps": _POSITIVE,
    "rope_theta": _POSITIVE,
    "rope_scaling": optional(_ROPE),
    "rope_parameters": optional(obj()),  # flat, or per layer type: checked by `_check_rope_parameters`
    "rope_local_base_freq": _POSITIVE,
    "partial_rotary_factor": number(0.0, 1.0),
    "tie_word_embeddings": boolean(),
    "attention_bias": boolean(),
    "mlp_bias": boolean(),
    "use_sliding_window": boolean(),
    "use_bidirectional_attention": optional(boolean()),
    "sliding_window": optional(integer(0)),
    "max_window_layers": optional(integer(0)),
    "sliding_window_pattern": optional(integer(1)),
    "layer_types": optional(list_of(string(), "strings")),
    "hidden_act": optional(string()),
    "hidden_activation": optional(string()),
    "pretraining_tp": optional(integer(1)),
    "query_pre_attn_scalar": optional(_POSITIVE),
    "final_logit_softcapping": optional(_POSITIVE),
    "attn_logit_softcapping": optional(_POSITIVE),
    "bos_token_id": _TOKEN_IDS,
    "eos_token_id": _TOKEN_IDS,
    "pad_token_id": _TOKEN_IDS,
    "torch_dtype": optional(string()),
    "dtype": optional(string()),
}


def check_config(hf: Any, source: str) -> dict[str, Any]:
    """A ``config.json`` dict checked field by field (`CONFIG_FIELDS`), and the head counts
    against each other; returns it."""
    hf = expect_object(hf, source)
    check_fields(hf, CONFIG_FIELDS, source)
    rope = hf.get("rope_parameters")
    if isinstance(rope, Mapping):
        per_type = bool(rope) and all(isinstance(v, Mapping) for v in rope.values())
        for name, params in (rope.items() if per_type else [("", rope)]):
            check_fields(params, ROPE_FIELDS, source, f"rope_parameters.{name + '.' if name else ''}")
    heads, kv = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    if _is_int(heads) and _is_int(kv) and heads % kv:
        raise CheckpointError(f"{source}: field num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv}")
    return hf


# --- tokenizer.json (the `tokenizers` library's serialization) ------------------------------------

def _added_token(v: Any) -> str | None:
    ok = isinstance(v, Mapping) and integer(0)(v.get("id")) is None and isinstance(v.get("content"), str)
    return None if ok else "an object with an integer id >= 0 and a string content"


def _merges(v: Any) -> str | None:
    # Hundreds of thousands of entries: one pass, no per-entry closures. "a b" strings or [a, b] pairs.
    ok = isinstance(v, list) and all(isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and isinstance(
        m[0], str) and isinstance(m[1], str)) for m in v)
    return None if ok else 'a list of merges ("a b" strings or [a, b] pairs)'


TOKENIZER_FIELDS: dict[str, Check] = {
    "version": string(),
    "model": obj({"type": string(), "vocab": optional(either(obj(), list_of(lambda v: None, "entries"))),
                  "merges": optional(_merges)}),
    "added_tokens": optional(list_of(_added_token, "objects with an integer id >= 0 and a string content")),
    "normalizer": optional(obj()),
    "pre_tokenizer": optional(obj()),
    "post_processor": optional(obj()),
    "decoder": optional(obj()),
    "truncation": optional(obj()),
    "padding": optional(obj()),
}


def check_tokenizer_file(path: str | Path) -> dict[str, Any]:
    """``tokenizer.json`` read and checked (`TOKENIZER_FIELDS`; ``model`` is required): a cut or
    malformed file is a `CheckpointError` naming it, before the tokenizer library sees it."""
    tok = read_json_object(path)
    if "model" not in tok:
        raise CheckpointError(f"{path}: missing required field 'model' (not a tokenizers file)")
    check_fields(tok, TOKENIZER_FIELDS, str(path))
    return tok


# --- adapter_config.json (PEFT) -------------------------------------------------------------------

ADAPTER_FIELDS: dict[str, Check] = {
    "peft_type": string(),
    "r": integer(1),
    "lora_alpha": _POSITIVE,
    "lora_dropout": number(0.0, 1.0, low_open=False),
    "target_modules": optional(either(string(), list_of(string(), "strings"))),
    "bias": string(),
    "use_rslora": boolean(),
    "use_dora": boolean(),
    "fan_in_fan_out": boolean(),
    "inference_mode": boolean(),
    "rank_pattern": optional(obj()),
    "alpha_pattern": optional(obj()),
    "modules_to_save": optional(list_of(string(), "strings")),
    "layers_to_transform": optional(either(integer(0), list_of(integer(0), "integers >= 0"))),
    "base_model_name_or_path": optional(string()),
    "task_type": optional(string()),
}


def check_adapter_config(config: Any, source: str) -> dict[str, Any]:
    """An ``adapter_config.json`` dict checked field by field (`ADAPTER_FIELDS`, and the values
    of ``rank_pattern`` (integers >= 1) and ``alpha_pattern`` (positive numbers))."""
    config = expect_object(config, source)
    check_fields(config, ADAPTER_FIELDS, source)
    for key, check in (("rank_pattern", integer(1)), ("alpha_pattern", _POSITIVE)):
        check_fields(config.get(key) or {}, dict.fromkeys(config.get(key) or {}, check), source, f"{key}.")
    return config
