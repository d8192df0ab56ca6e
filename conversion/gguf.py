"""llama.cpp GGUF files -> params (HF names, HF layouts), config, tokenizer.

Architectures (``general.architecture``): ``llama`` (Llama 1/2/3 without RoPE-scaling tensors,
SmolLM2, and Mistral, which llama.cpp's converter writes as ``llama``), ``qwen2``, ``qwen3`` and
``gemma3``. Each is one `Arch` entry in `ARCHS`: its tensor-name table and the transforms llama.cpp's
``convert_hf_to_gguf.py`` applied, which we undo:

- ``llama``: the rows of the Q and K projections are permuted (``LlamaModel.permute``) so that its
  RoPE can rotate adjacent pairs; we undo it as transformers' GGUF loader does
  (``LlamaTensorProcessor._reverse_permute_weights``), back to HF's rotate-half layout. The other
  architectures use llama.cpp's NEOX RoPE (halves), so their weights are stored unpermuted.
- ``gemma3``: every RMSNorm weight is stored as ``1 + w`` (``Gemma3Model.modify_tensors``); we
  subtract 1, as transformers' ``Gemma2TensorProcessor`` does.

Every tensor is dequantised with ``gguf.quants`` (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, Q2_K-Q6_K,
...) to float32 (then cast to ``dtype``), one at a time, so loading never holds two copies of the
model. The file is read with `GGUFFile` (``gguf_reader.py``), which parses the header in well under a
second even for a 262k-token vocabulary and leaves tensor data in the memory map.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from hcnr_jax.config import ModelConfig, config_from_hf
from hcnr_jax.conversion.gguf_reader import GGUFFile
from hcnr_jax.conversion.hf import DTYPES, cast_checked
from hcnr_jax.errors import CheckpointError
from hcnr_jax.params import Params, param_specs, unflatten

log = logging.getLogger(__name__)

# GGUF tensor name -> HF tensor name. ``{i}`` is the block index.
_COMMON_TENSORS: dict[str, str] = {
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
}
# Llama's second norm is the MLP's input norm; llama.cpp calls it ffn_norm.
TENSOR_TABLE: dict[str, str] = {**_COMMON_TENSORS,
                                "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight"}
_QK_NORMS = {"blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
             "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight"}
_QKV_BIASES = {f"blk.{{i}}.attn_{x}.bias": f"model.layers.{{i}}.self_attn.{x}_proj.bias" for x in "qkv"}
# Gemma 3: ffn_norm is the pre-MLP norm; post_attention_norm and post_ffw_norm follow the sublayers.
_GEMMA3_TENSORS = {
    **_COMMON_TENSORS, **_QK_NORMS,
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}

# GGUF metadata key (after ``<arch>.``) -> HF config key; the same for every architecture here.
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


def _gemma3_config(get: Callable[[str], Any], hf: dict[str, Any]) -> None:
    """What llama.cpp's Gemma 3 hparams (``llama-model.cpp``) assume beyond the metadata: every 6th
    layer global, sliding layers with RoPE base 10000, attention scale 1/sqrt(head_dim)
    (1/sqrt(hidden/heads) for the 62-layer 27B), no soft-capping. The gguf package's newer keys
    (``attention.sliding_window_pattern``, ``rope.freq_base_swa``) override the first two when present."""
    window = get("attention.sliding_window")
    if window is None:
        raise CheckpointError("missing metadata field gemma3.attention.sliding_window")
    hf["sliding_window"] = int(window)
    pattern = get("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # newer files: one flag per layer, True = sliding
        hf["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        hf["sliding_window_pattern"] = int(pattern or 6)
    hf["rope_local_base_freq"] = _f32(get("rope.freq_base_swa") or 10000.0)
    layers, heads = int(hf["num_hidden_layers"]), int(hf["num_attention_heads"])
    hf["query_pre_attn_scalar"] = int(hf["hidden_size"]) // heads if layers == 62 else int(hf["head_dim"])
    hf["final_logit_softcapping"] = None  # Gemma 3 has none; llama.cpp reads none for it


@dataclass(frozen=True)
class Arch:
    """llama.cpp's conventions for one ``general.architecture``."""

    model_type: str  # the HF model_type it loads as
    hf_class: str
    tensors: Mapping[str, str]  # GGUF name -> HF name (``{i}``: block index)
    permute_qk: bool = False  # undo LlamaModel.permute on the Q/K rows
    norm_offset: float = 0.0  # the converter added this to every RMSNorm weight
    hf_fixed: Mapping[str, Any] = field(default_factory=dict)  # config fields the metadata does not hold
    config: Callable[[Callable[[str], Any], dict[str, Any]], None] | None = None  # more metadata -> config


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", "LlamaForCausalLM", TENSOR_TABLE, permute_qk=True,
                  hf_fixed={"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}),
    "qwen2": Arch("qwen2", "Qwen2ForCausalLM", {**TENSOR_TABLE, **_QKV_BIASES},
                  hf_fixed={"hidden_act": "silu", "use_sliding_window": False}),
    "qwen3": Arch("qwen3", "Qwen3ForCausalLM", {**TENSOR_TABLE, **_QK_NORMS},
                  hf_fixed={"hidden_act": "silu", "attention_bias": False, "use_sliding_window": False}),
    "gemma3": Arch("gemma3_text", "Gemma3ForCausalLM", _GEMMA3_TENSORS, norm_offset=1.0,
                   hf_fixed={"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False},
                   config=_gemma3_config),
}

# Tokens that end an assistant turn in common chat templates (ChatML, Llama 3, Phi, Gemma).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def _patterns(table: Mapping[str, str]) -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), h) for g, h in table.items()]


def hf_name(gguf_name: str, table: Mapping[str, str] = TENSOR_TABLE) -> str | None:
    """HF tensor name of a GGUF tensor name, None when it is not in the table."""
    for pattern, target in _patterns(table):
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
    entry = reader.fields.get(key)
    if entry is None:
        return default
    try:
        return entry.contents()
    except Exception as e:  # gguf raises plain ValueError/IndexError on corrupt fields
        raise CheckpointError(f"{path}: cannot read metadata field {key} ({e})") from e


def _f32(x: float) -> float:
    # GGUF stores float32: keep its shortest decimal (9.99999974e-06 -> 1e-05), as config.json had it.
    return float(str(np.float32(x)))


def gguf_arch(reader: Any, path: Path) -> tuple[str, Arch]:
    """(``general.architecture``, its `Arch`); an unsupported one is an error naming it."""
    name = _value(reader, "general.architecture", path)
    if name not in ARCHS:
        raise CheckpointError(f"{path}: unsupported GGUF architecture general.architecture={name!r}; "
                              f"supported: {sorted(ARCHS)}")
    return name, ARCHS[name]


def _rope_scaling(get: Callable[[str], Any], name: str, path: Path) -> dict[str, Any]:
    scaling = get("rope.scaling.type")
    if scaling in (None, "none"):
        return {"rope_type": "default"}
    if scaling == "linear":
        return {"rope_type": "linear", "factor": _f32(get("rope.scaling.factor"))}
    raise CheckpointError(f"{path}: unsupported RoPE scaling {name}.rope.scaling.type={scaling!r}")


def hf_config_from_gguf(reader: Any, path: Path) -> dict[str, Any]:
    """A config.json dict of the architecture's HF model from the GGUF metadata; unsupported settings
    (other architectures, RoPE scaling but linear, partial rotary) are rejected."""
    name, arch = gguf_arch(reader, path)

    def get(key: str) -> Any:
        return _value(reader, f"{name}.{key}", path)

    hf: dict[str, Any] = {"architectures": [arch.hf_class], "model_type": arch.model_type, **arch.hf_fixed}
    for key, target in CONFIG_TABLE.items():
        if (value := get(key)) is not None:
            hf[target] = value
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
        if CONFIG_TABLE[key] not in hf:
            raise CheckpointError(f"{path}: missing metadata field {name}.{key}")
    heads = int(hf["num_attention_heads"])
    hf.setdefault("num_key_value_heads", heads)
    hf.setdefault("head_dim", int(hf["hidden_size"]) // heads)
    rot = get("rope.dimension_count")
    if rot is not None and int(rot) != int(hf["head_dim"]):
        raise CheckpointError(f"{path}: partial rotary ({name}.rope.dimension_count={rot}, head_dim="
                              f"{hf['head_dim']}) is not supported")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is not None:  # the embedding's rows are the vocabulary the model has, whatever the metadata says
        hf["vocab_size"] = int(embd.data.shape[0])  # rows, for GGUFReader's tensors and ours alike
    elif "vocab_size" not in hf:
        raise CheckpointError(f"{path}: no token_embd.weight tensor and no {name}.vocab_size")
    hf["rope_parameters"] = {**_rope_scaling(get, name, path), "rope_theta": _f32(hf.pop("rope_theta", 10000.0))}
    hf["rms_norm_eps"] = _f32(hf.get("rms_norm_eps", 1e-5))
    hf["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    if arch.config is not None:
        try:
            arch.config(get, hf)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from e
    if "sliding_window_pattern" in hf or "layer_types" in hf:  # the global layers take rope_parameters
        hf["rope_theta"] = hf["rope_parameters"]["rope_theta"]
        scaling = {k: v for k, v in hf.pop("rope_parameters").items() if k != "rope_theta"}
        hf["rope_scaling"] = None if scaling["rope_type"] == "default" else scaling
    for key, target in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        value = _value(reader, f"tokenizer.ggml.{key}_token_id", path)
        if value is not None:
            hf[target] = int(value)
    return {k: (int(v) if isinstance(v, (np.integer,)) else v) for k, v in hf.items()}


def _read_reader(path: Path) -> Any:
    """The file's header (`GGUFFile`); tensor data stays in the memory map."""
    try:
        import gguf  # noqa: F401  (dequantisation and the GGML type table)
    except ImportError as e:
        raise missing_package_error(path, "reading a GGUF file", e) from e
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        return GGUFFile(path)
    except CheckpointError:
        raise
    except OSError as e:
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

    arch_name, arch = gguf_arch(reader, path)
    patterns = arch.tensors
    specs = param_specs(cfg)
    mapping: dict[str, Any] = {}
    for t in reader.tensors:
        name = hf_name(t.name, patterns)
        if name is None or name not in specs:
            raise CheckpointError(f"{path}: unexpected tensor {t.name} (not a {arch_name} tensor this config has)")
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
        w = w.reshape(-1) if len(specs[name]) == 1 else w.reshape(w.shape[0], -1)
        if tuple(w.shape) != tuple(specs[name]):
            raise CheckpointError(
                f"{path}: tensor {t.name} has shape {tuple(w.shape)}, the metadata implies {tuple(specs[name])}"
            )
        if arch.permute_qk and name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, cfg.num_heads)
        elif arch.permute_qk and name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, cfg.num_kv_heads)
        elif arch.norm_offset and name.endswith("norm.weight"):
            w = w - np.float32(arch.norm_offset)
        out[name] = convert(name, w)
        del w
    return out


# ---------------------------------------------------------------- tokenizer
#
# Built from the GGUF metadata with `tokenizers` and wrapped as a transformers
# ``PreTrainedTokenizerFast``. transformers' own GGUF tokenizer path
# (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``) is not used: its GGUF reader imports torch,
# which is only a test dependency here. The result is the same tokenizer (same tokenizer.json,
# special tokens and chat template; tests/test_gguf.py compares the two), cached in the user's cache
# folder (hcnr_jax.user_cache) under a hash of the metadata it is built from.

TOKENIZER_FORMAT = 2  # bump whenever the built tokenizer changes: it is part of the cache key
TOKENIZER_ENTRIES = "tokenizers"

# GGUF metadata key -> name (transformers' GGUF_TOKENIZER_MAPPING names).
TOKENIZER_FIELDS: dict[str, str] = {
    "tokenizer.ggml.model": "tokenizer_type",
    "tokenizer.ggml.pre": "pre_tokenizer_type",
    "tokenizer.ggml.tokens": "tokens",
    "tokenizer.ggml.scores": "scores",
    "tokenizer.ggml.token_type": "token_type",
    "tokenizer.ggml.merges": "merges",
    "tokenizer.ggml.precompiled_charsmap": "precompiled_charsmap",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
    "tokenizer.ggml.add_space_prefix": "add_prefix_space",
    "tokenizer.ggml.add_bos_token": "add_bos_token",
    "tokenizer.ggml.add_eos_token": "add_eos_token",
    "tokenizer.chat_template": "chat_template",
}
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4  # llama.cpp's llama_token_type

# Pre-tokenizer split of byte-level vocabularies by ``tokenizer.ggml.pre`` (as transformers 5.24's
# GGUF_PRE_TOKENIZER_SPLITS). Others, SmolLM2's "smollm" included, keep GPT-2's ByteLevel regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

# Python module -> its pip distribution, where they differ.
_PIP_NAMES = {"yaml": "pyyaml", "jinja2": "Jinja2"}


def missing_package_error(path: Path, what: str, e: ImportError) -> CheckpointError:
    """A CheckpointError naming the package that ``e`` found missing and the pip command that
    installs it (with hcnr-jax's version bounds for it)."""
    import importlib.metadata

    err: BaseException | None = e
    while err is not None and not getattr(err, "name", None):  # transformers' lazy imports wrap the original
        err = err.__cause__ or err.__context__
    if err is None:
        return CheckpointError(f"{path}: {what} failed on an import ({e})")
    module = err.name.split(".")[0]
    dist = _PIP_NAMES.get(module, module)
    spec = dist
    try:
        for req in importlib.metadata.requires("hcnr-jax") or ():
            name = re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]
            if name.lower().replace("_", "-") == dist.lower().replace("_", "-") and "extra ==" not in req:
                spec = req.split(";")[0].strip()
                break
    except importlib.metadata.PackageNotFoundError:
        pass
    return CheckpointError(
        f"{path}: {what} needs the Python package '{dist}', which is not installed or cannot be imported "
        f"({err}); install it with: pip install \"{spec}\""
    )


def tokenizer_metadata(reader: Any, path: Path) -> dict[str, Any]:
    """The GGUF tokenizer fields (``TOKENIZER_FIELDS`` names) and ``architecture``; the build input."""
    meta: dict[str, Any] = {"architecture": _value(reader, "general.architecture", path)}
    for key, name in TOKENIZER_FIELDS.items():
        value = _value(reader, key, path)
        if value is not None:
            meta[name] = value
    tokens = meta["tokens"]
    for name in ("token_type", "scores"):
        if name in meta and len(meta[name]) != len(tokens):
            raise CheckpointError(f"{path}: tokenizer.ggml.{name} has {len(meta[name])} entries for "
                                  f"{len(tokens)} tokens")
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        if name in meta and not 0 <= int(meta[name]) < len(tokens):
            raise CheckpointError(f"{path}: tokenizer.ggml.{name} = {meta[name]} is outside the vocabulary "
                                  f"of {len(tokens)} tokens")
    return meta


def tokenizer_key(meta: dict[str, Any]) -> str:
    """Cache key: sha256 of the metadata, this builder's format and the libraries' versions."""
    import hashlib
    import importlib.metadata

    versions = {d: importlib.metadata.version(d) for d in ("tokenizers", "transformers")}
    blob = json.dumps({"format": TOKENIZER_FORMAT, "versions": versions, "meta": meta}, sort_keys=True,
                      ensure_ascii=False, default=float)
    return hashlib.sha256(blob.encode()).hexdigest()


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level vocabularies are written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _byte_level_backend(meta: dict[str, Any], path: Path) -> Any:
    """``tokenizer.ggml.model == "gpt2"``: byte-level BPE (GPT-2, SmolLM2, Llama 3, ...)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    if "merges" not in meta:
        raise CheckpointError(f"{path}: byte-level (gpt2) vocabulary without tokenizer.ggml.merges")
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    tokens = meta["tokens"]
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["merges"]]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    types = meta.get("token_type") or [0] * len(tokens)
    # Control tokens are special; one spelled outside the byte alphabet is a llama.cpp mislabel (adding
    # it would grow the vocabulary past the model's), so it is skipped, as transformers does.
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types, strict=True)
               if ty == _TOKEN_TYPE_CONTROL and set(t) <= alphabet]
    if control:
        tok.add_special_tokens(control)
    have = tok.get_vocab(with_added_tokens=True)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types, strict=True)
            if ty == _TOKEN_TYPE_USER_DEFINED and t in have]
    if user:
        tok.add_tokens(user)
    split = PRE_TOKENIZER_SPLITS.get(meta.get("pre_tokenizer_type"))
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return tok


def _transformers_backend(meta: dict[str, Any], path: Path) -> Any:
    """Other vocabularies (sentencepiece "llama", "t5", ...): transformers' GGUF tokenizer
    converter, the part of its GGUF support that needs no torch."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError as e:
        if e.name and e.name.split(".")[0] != "transformers":
            raise
        raise CheckpointError(
            f"{path}: tokenizer.ggml.model={meta.get('tokenizer_type')!r} needs transformers' GGUF tokenizer "
            f"converter (transformers.integrations.gguf, in transformers 5.24), which this transformers lacks ({e})"
        ) from e
    fields = {k: v for k, v in meta.items()
              if k not in ("architecture", "chat_template", "add_bos_token", "add_eos_token")}
    backend, _ = convert_gguf_tokenizer(meta["architecture"], fields)
    return backend


def build_tokenizer(meta: dict[str, Any], path: Path) -> Any:
    """The tokenizer the GGUF metadata ``meta`` describes, as a ``PreTrainedTokenizerFast`` (no cache)."""
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer_type")
    try:
        backend = _byte_level_backend(meta, path) if kind == "gpt2" else _transformers_backend(meta, path)
    except (ImportError, CheckpointError):
        raise
    except Exception as e:  # bad merges, regexes, unsupported types: tokenizers/transformers raise plain errors
        raise CheckpointError(f"{path}: cannot build the tokenizer from the GGUF metadata "
                              f"(tokenizer.ggml.model={kind!r}; {type(e).__name__}: {e})") from e
    kwargs: dict[str, Any] = {}
    if meta.get("chat_template"):
        kwargs["chat_template"] = meta["chat_template"]
    # As transformers' GGUF path: sentencepiece files without the flag add BOS (llama.cpp's default).
    add_bos = meta.get("add_bos_token", True if kind == "llama" else None)
    if kind == "gemma4":
        add_bos = False
    if add_bos is not None:
        kwargs["add_bos_token"] = bool(add_bos)
    if "add_eos_token" in meta:
        kwargs["add_eos_token"] = bool(meta["add_eos_token"])
    for name in ("bos", "eos", "unk", "pad"):
        token_id = meta.get(f"{name}_token_id")
        kwargs[f"{name}_token"] = meta["tokens"][int(token_id)] if token_id is not None else None
    if str(meta.get("architecture", "")).startswith("gemma") and kind == "llama":
        # transformers builds Gemma vocabularies as a GemmaTokenizer: its defaults (mask token "<mask>",
        # left padding) and class name go with it into tokenizer_config.json.
        from transformers import GemmaTokenizer

        return GemmaTokenizer(tokenizer_object=backend, **kwargs)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _load_cached(entry: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(entry))


def _tokenizer(path: Path, reader: Any, cache: bool = True) -> Any | None:
    """The GGUF's tokenizer with its chat template (None when the file has no vocabulary): from the
    user's cache folder when built before, else built and cached there."""
    from hcnr_jax import user_cache

    if "tokenizer.ggml.tokens" not in reader.fields:
        log.warning("%s: no tokenizer in the GGUF metadata; the model is loaded without one", path)
        return None
    meta = tokenizer_metadata(reader, path)
    try:
        key = tokenizer_key(meta) if cache else None
        tok = None
        if key is not None and (entry := user_cache.read_entry(TOKENIZER_ENTRIES, key)) is not None:
            try:
                tok = _load_cached(entry)
            except ImportError:
                raise
            except Exception as e:
                log.warning("ignoring unreadable cached tokenizer %s (%s: %s); rebuilding it", entry,
                            type(e).__name__, e)
                tok = None
        if tok is None:
            tok = build_tokenizer(meta, path)
            if key is not None:
                try:
                    user_cache.write_entry(TOKENIZER_ENTRIES, key, tok.save_pretrained)
                except Exception as e:  # a cache that cannot be written never stops a load
                    log.warning("could not cache the tokenizer of %s (%s: %s)", path, type(e).__name__, e)
    except ImportError as e:
        raise missing_package_error(path, "building the tokenizer", e) from e
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


@dataclass(frozen=True)
class GGUFModel:
    """What a GGUF file holds, as `hcnr_jax.pretrained.load_pretrained` builds a model from it: the
    resolved config, parameters (HF names and layouts), tokenizer (None when not asked for), the HF
    config.json dict and the generation config."""

    config: ModelConfig
    params: Params
    tokenizer: Any | None
    hf_config: dict[str, Any]
    generation_config: dict[str, Any]


def read_gguf_config(path: Path) -> dict[str, Any]:
    """The HF config.json dict of the GGUF file at ``path``, from its header alone."""
    return hf_config_from_gguf(_read_reader(path), path)


def load_gguf(path: Path, dtype: str | None = None, tokenizer: bool = True) -> GGUFModel:
    """Read a GGUF file of any `ARCHS` architecture -> `GGUFModel` (float32 unless ``dtype``).

    The config, tokenizer (with the chat template) and generation config come from the GGUF
    metadata; ``save_pretrained`` of the model built from it writes a directory that transformers
    loads. ``tokenizer=False`` skips the tokenizer. It is built without torch and cached in the
    user's cache folder (``hcnr_jax.user_cache``), keyed by a hash of the tokenizer metadata.
    """
    path = Path(path)
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; choose one of {list(DTYPES)}")
    reader = _read_reader(path)
    hf = hf_config_from_gguf(reader, path)
    cfg = config_from_hf(hf, source=str(path))
    # Before the tensors, so that a missing package or a bad vocabulary fails fast.
    tok = _tokenizer(path, reader) if tokenizer else None
    target = DTYPES[dtype or "float32"]
    flat = read_gguf_tensors(reader, path, cfg, lambda name, w: jnp.asarray(cast_checked(w, target, name, str(path))))
    gen = generation_config(hf, reader, tok, path)
    return GGUFModel(cfg, unflatten(flat, cfg.num_layers), tok, hf, gen)
