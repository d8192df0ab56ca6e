"""llama.cpp GGUF files -> params (HF names, HF layouts), config, tokenizer.

Only the ``llama`` architecture is supported (SmolLM2, Llama 1/2/3 without RoPE scaling
tensors, Mistral exported as llama). Every tensor is dequantised with ``gguf.quants`` to float32
(then cast to ``dtype``), one at a time, so loading never holds two copies of the model.

Conversion is a rename plus one transform: llama.cpp's converter permutes the rows of the Q and K
projections (``convert_hf_to_gguf.py``: ``LlamaModel.permute``) so that its RoPE can rotate
adjacent pairs; we undo it exactly as transformers' GGUF loader does
(``LlamaTensorProcessor._reverse_permute_weights``), which brings the weights back to HF's
rotate-half layout.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hcnr_jax.config import config_from_hf
from hcnr_jax.conversion.hf import DTYPES
from hcnr_jax.errors import CheckpointError
from hcnr_jax.params import param_specs, unflatten

log = logging.getLogger(__name__)

# GGUF tensor name -> HF tensor name. ``{i}`` is the block index.
TENSOR_TABLE: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
_PATTERNS = [
    (re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), h) for g, h in TENSOR_TABLE.items()
]

# GGUF metadata key (after ``llama.``) -> HF config key.
CONFIG_TABLE: dict[str, str] = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "vocab_size": "vocab_size",
}

# Tokens that end an assistant turn in common chat templates (ChatML, Llama 3, Phi, Gemma).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def hf_name(gguf_name: str) -> str | None:
    """HF tensor name of a GGUF tensor name, None when it is not in the table."""
    for pattern, target in _PATTERNS:
        m = pattern.match(gguf_name)
        if m:
            return target.format(i=m.group(1)) if m.groups() else target
    return None


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: ``w [n_head * head_dim, in]`` stores, per head, the
    rows as interleaved (even, odd) pairs; HF keeps the two halves of each head contiguous."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _value(reader: Any, key: str, path: Path, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception as e:  # gguf raises plain ValueError/IndexError on corrupt fields
        raise CheckpointError(f"{path}: cannot read metadata field {key} ({e})") from e


def _f32(x: float) -> float:
    # GGUF stores float32: keep its shortest decimal (9.99999974e-06 -> 1e-05), as config.json had it.
    return float(str(np.float32(x)))


def hf_config_from_gguf(reader: Any, path: Path) -> dict[str, Any]:
    """A LlamaConfig-compatible config.json dict from the GGUF metadata; unsupported settings
    (other architectures, RoPE scaling, partial rotary) are rejected."""
    arch = _value(reader, "general.architecture", path)
    if arch != "llama":
        raise CheckpointError(
            f"{path}: unsupported GGUF architecture general.architecture={arch!r}; only 'llama' is supported"
        )
    hf: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"}
    for key, target in CONFIG_TABLE.items():
        value = _value(reader, f"llama.{key}", path)
        if value is not None:
            hf[target] = value
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
        if CONFIG_TABLE[key] not in hf:
            raise CheckpointError(f"{path}: missing metadata field llama.{key}")
    heads = int(hf["num_attention_heads"])
    hf.setdefault("num_key_value_heads", heads)
    hf.setdefault("head_dim", int(hf["hidden_size"]) // heads)
    rot = _value(reader, "llama.rope.dimension_count", path, hf["head_dim"])
    if int(rot) != int(hf["head_dim"]):
        raise CheckpointError(f"{path}: partial rotary (llama.rope.dimension_count={rot}, head_dim="
                              f"{hf['head_dim']}) is not supported")
    scaling = _value(reader, "llama.rope.scaling.type", path)
    if scaling not in (None, "none"):
        raise CheckpointError(f"{path}: unsupported RoPE scaling llama.rope.scaling.type={scaling!r}")
    if "vocab_size" not in hf:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise CheckpointError(f"{path}: no llama.vocab_size and no tokenizer.ggml.tokens")
        hf["vocab_size"] = len(tokens.data)
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": _f32(hf.pop("rope_theta", 10000.0))}
    hf["rms_norm_eps"] = _f32(hf.get("rms_norm_eps", 1e-5))
    names = {t.name for t in reader.tensors}
    hf["tie_word_embeddings"] = "output.weight" not in names
    hf["attention_bias"] = False
    hf["mlp_bias"] = False
    for key, target in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        value = _value(reader, f"tokenizer.ggml.{key}_token_id", path)
        if value is not None:
            hf[target] = int(value)
    return {k: (int(v) if isinstance(v, (np.integer,)) else v) for k, v in hf.items()}


def _read_reader(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # truncated or corrupt files surface as ValueError/struct/IndexError
        raise CheckpointError(f"{path}: cannot read GGUF file ({type(e).__name__}: {e})") from e


def read_gguf_tensors(
    reader: Any,
    path: Path,
    cfg: Any,
    convert: Callable[[str, np.ndarray], Any],
) -> dict[str, Any]:
    """Dequantise every tensor of ``reader`` into ``param_specs(cfg)``, one at a time; strict on
    names (each GGUF tensor maps to exactly one expected HF tensor) and shapes."""
    from gguf.quants import dequantize

    specs = param_specs(cfg)
    mapping: dict[str, Any] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None or name not in specs:
            raise CheckpointError(f"{path}: unexpected tensor {t.name} (not a llama tensor this config has)")
        if name in mapping:
            raise CheckpointError(f"{path}: tensor {t.name} appears twice")
        mapping[name] = t
    missing = [n for n in specs if n not in mapping]
    if missing:
        raise CheckpointError(
            f"{path}: missing tensor for {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    out: dict[str, Any] = {}
    for name in specs:
        t = mapping[name]
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot dequantise tensor {t.name} ({t.tensor_type.name}: {e})") from e
        if tuple(w.shape) != tuple(specs[name]):
            raise CheckpointError(
                f"{path}: tensor {t.name} has shape {tuple(w.shape)}, the metadata implies {tuple(specs[name])}"
            )
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, cfg.num_kv_heads)
        out[name] = convert(name, w)
        del w
    return out


def _tokenizer(path: Path, reader: Any) -> Any | None:
    from transformers import AutoTokenizer

    if "tokenizer.ggml.tokens" not in reader.fields:
        log.warning("%s: no tokenizer in the GGUF metadata; the model is loaded without one", path)
        return None

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot build the tokenizer from the GGUF metadata ({e})") from e
    template = _value(reader, "tokenizer.chat_template", path)
    if template and not tok.chat_template:
        tok.chat_template = template
    if not tok.chat_template:
        log.warning("%s: no chat template in the GGUF metadata", path)
    return tok


def generation_config(hf: dict[str, Any], reader: Any, tokenizer: Any, path: Path) -> dict[str, Any]:
    """generation_config.json contents: eos ids include the end-of-turn token, so that greedy
    generation stops at the end of the assistant's turn."""
    eos: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        value = _value(reader, key, path)
        if value is not None:
            eos.append(int(value))
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        eos.extend(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    eos = list(dict.fromkeys(eos))
    gen: dict[str, Any] = {}
    if "bos_token_id" in hf:
        gen["bos_token_id"] = hf["bos_token_id"]
    if eos:
        gen["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    if "pad_token_id" in hf:
        gen["pad_token_id"] = hf["pad_token_id"]
    return gen


def load_gguf(path: Path, dtype: str | None = None, tokenizer: bool = True) -> Any:
    """Load a llama GGUF file -> ``Pretrained`` (float32 unless ``dtype``).

    The config, tokenizer (with the chat template) and generation config come from the GGUF
    metadata; ``save_pretrained`` of the result writes a directory that transformers loads.
    ``tokenizer=False`` skips building the tokenizer (the slow part for large vocabularies).
    """
    import jax.numpy as jnp

    from hcnr_jax.pretrained import Pretrained

    path = Path(path)
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; choose one of {list(DTYPES)}")
    reader = _read_reader(path)
    hf = hf_config_from_gguf(reader, path)
    cfg = config_from_hf(hf, source=str(path))
    target = DTYPES[dtype or "float32"]
    flat = read_gguf_tensors(reader, path, cfg, lambda name, w: jnp.asarray(w.astype(target, copy=False)))
    tok = _tokenizer(path, reader) if tokenizer else None
    gen = generation_config(hf, reader, tok, path)
    return Pretrained(cfg, unflatten(flat, cfg.num_layers), tok, hf, str(path), {}, gen)
