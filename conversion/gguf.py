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

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hcnr_jax.config import config_from_hf
from hcnr_jax.conversion.hf import DTYPES, cast_checked
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
    try:
        import gguf
    except ImportError as e:
        raise missing_package_error(path, "reading a GGUF file", e) from e

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


# ---------------------------------------------------------------- tokenizer
#
# Built from the GGUF metadata with `tokenizers` and wrapped as a transformers
# ``PreTrainedTokenizerFast``. transformers' own GGUF tokenizer path
# (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``) is not used: its GGUF reader imports torch,
# which is only a test dependency here. The result is the same tokenizer (same tokenizer.json,
# special tokens and chat template; tests/test_gguf.py compares the two), cached in the user's cache
# folder (hcnr_jax.cache) under a hash of the metadata it is built from.

TOKENIZER_FORMAT = 1  # bump whenever the built tokenizer changes: it is part of the cache key
TOKENIZER_CACHE = "tokenizers"

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
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _load_cached(entry: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(entry))


def _tokenizer(path: Path, reader: Any, cache: bool = True) -> Any | None:
    """The GGUF's tokenizer with its chat template (None when the file has no vocabulary): from the
    user's cache folder when built before, else built and cached there."""
    from hcnr_jax import cache as user_cache

    if "tokenizer.ggml.tokens" not in reader.fields:
        log.warning("%s: no tokenizer in the GGUF metadata; the model is loaded without one", path)
        return None
    meta = tokenizer_metadata(reader, path)
    try:
        key = tokenizer_key(meta) if cache else None
        tok = None
        if key is not None and (entry := user_cache.read_entry(TOKENIZER_CACHE, key)) is not None:
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
                    user_cache.write_entry(TOKENIZER_CACHE, key, tok.save_pretrained)
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


def load_gguf(path: Path, dtype: str | None = None, tokenizer: bool = True) -> Any:
    """Load a llama GGUF file -> ``Pretrained`` (float32 unless ``dtype``).

    The config, tokenizer (with the chat template) and generation config come from the GGUF
    metadata; ``save_pretrained`` of the result writes a directory that transformers loads.
    ``tokenizer=False`` skips the tokenizer. It is built without torch and cached in the user's cache
    folder (``hcnr_jax.cache``), keyed by a hash of the tokenizer metadata.
    """
    import jax.numpy as jnp

    from hcnr_jax.pretrained import Pretrained

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
    return Pretrained(cfg, unflatten(flat, cfg.num_layers), tok, hf, str(path), {}, gen)
