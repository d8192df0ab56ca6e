"""Loading and saving whole models: ``load_pretrained``, ``save_pretrained``, ``logits``.

``src`` is a model source (`hcnr_jax.source.ModelSource`): a Hugging Face directory, a ``.gguf``
file, a hub id ``org/name[@revision]``, or any of these followed by ``+ADAPTER_DIR`` (PEFT LoRA
adapters merged onto the base in order).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hcnr_jax.config import ModelConfig, config_from_hf
from hcnr_jax.conversion import hf as hf_io
from hcnr_jax.errors import CheckpointError, HcnrError
from hcnr_jax.io import atomic_output_dir
from hcnr_jax.model import forward
from hcnr_jax.params import Params, flatten, param_specs
from hcnr_jax.source import ModelSource, hub_snapshot

log = logging.getLogger(__name__)

# Files carried verbatim from the source directory, so tokenizer and generation settings of the
# written model are byte-identical to the input's.
CARRIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class Pretrained:
    """A loaded model: resolved config, parameter pytree (HF names, HF layouts), tokenizer.

    ``hf_config`` is the config.json dict written back on save; ``carried`` maps file names to
    source paths copied verbatim on save (tokenizer, generation config); ``generation_config``
    is used when there is no such file (e.g. GGUF sources).
    """

    config: ModelConfig
    params: Params
    tokenizer: Any | None
    hf_config: dict[str, Any]
    source: str
    carried: dict[str, Path] = field(default_factory=dict)
    generation_config: dict[str, Any] | None = None

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.params["model"]["embed_tokens"]["weight"].dtype)

    def replace(self, **changes: Any) -> Pretrained:
        return dataclasses.replace(self, **changes)


def _load_tokenizer(model_dir: Path) -> Any | None:
    if not any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        log.warning("%s: no tokenizer files; the model is loaded without a tokenizer", model_dir)
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # the tokenizers library raises plain Exceptions for files it cannot parse
        check_tokenizer_files(model_dir)  # names the file and field where our schema can tell
        raise CheckpointError(f"{model_dir}: cannot load its tokenizer ({type(e).__name__}: {e})") from e


def check_tokenizer_files(model_dir: Path) -> None:
    """The model directory's ``tokenizer.json``, when it has one, checked (`schema.check_tokenizer_file`)."""
    from hcnr_jax.schema import check_tokenizer_file

    if (model_dir / "tokenizer.json").is_file():
        check_tokenizer_file(model_dir / "tokenizer.json")


def _load_dir(model_dir: Path, dtype: str | None, mesh: Any = None, fsdp: bool = False) -> Pretrained:
    # The config, then the tokenizer (its library checks tokenizer.json whole), before any weight is read.
    config_from_hf(hf_io.read_config(model_dir), source=str(model_dir / "config.json"))
    tokenizer = _load_tokenizer(model_dir)
    cfg, hf, params = hf_io.load_params(model_dir, dtype=dtype, mesh=mesh, fsdp=fsdp)
    carried = {n: model_dir / n for n in CARRIED_FILES if (model_dir / n).is_file()}
    return Pretrained(cfg, params, tokenizer, hf, str(model_dir), carried)


def _placed(model: Pretrained, mesh: Any, fsdp: bool) -> Pretrained:
    if mesh is None:
        return model
    from hcnr_jax import sharding

    return model.replace(params=sharding.put_tree(model.params, sharding.param_shardings(model.params, mesh, fsdp)))


def load_pretrained(src: str | Path, dtype: str | None = None, *, mesh: Any = None, fsdp: bool = False) -> Pretrained:
    """Load a model from a HF directory, a ``.gguf`` file, a hub id or ``BASE+ADAPTER_DIR[+...]``.

    ``dtype`` ("float32", "bfloat16", "float16") casts the parameters; None keeps the stored
    dtype (GGUF tensors are dequantised to float32 unless told otherwise).

    ``mesh`` (a ``jax.sharding.Mesh``, or a spec such as ``"data=2,model=4"``) places every
    parameter in its sharding by role (`hcnr_jax.sharding.param_shardings`; ``fsdp`` also splits
    the ``embed`` dimension over ``data``), the sharding the statistics, repair and training steps
    use, so that they need no resharding. A HF directory is streamed tensor by tensor straight
    into that placement; a GGUF file or a merged adapter is placed once built.

    ``src`` is parsed once (`ModelSource.parse`; a parsed source is accepted too): an existing
    local path always wins over a hub id or a ``+`` split.
    """
    if dtype is not None and dtype not in hf_io.DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; choose one of {list(hf_io.DTYPES)}")
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        from hcnr_jax.sharding import make_mesh

        mesh = make_mesh(mesh)
    from hcnr_jax.conversion.lora import merge_lora, read_adapter_config

    source = ModelSource.parse(src)
    for adapter in source.adapters:
        read_adapter_config(Path(adapter))  # each adapter's settings are checked before any weight is read
    model = _load_base(source, dtype, mesh, fsdp)
    if not source.adapters:
        return model

    for adapter in source.adapters:
        model = merge_lora(model, Path(adapter))  # its source becomes BASE+ADAPTER
    return _placed(model, mesh, fsdp)


def base_path(source: ModelSource) -> Path:
    """The local path of ``source``'s base (a hub id: its snapshot folder)."""
    return hub_snapshot(source.base, source.revision) if source.hub else Path(source.base)


def _load_base(source: ModelSource, dtype: str | None, mesh: Any, fsdp: bool) -> Pretrained:
    path = base_path(source)
    if source.is_gguf:
        from hcnr_jax.conversion.gguf import load_gguf

        parts = load_gguf(path, dtype=dtype)
        model = Pretrained(parts.config, parts.params, parts.tokenizer, parts.hf_config, str(path), {},
                           parts.generation_config)
        return _placed(model, mesh, fsdp)
    if path.is_dir():
        model = _load_dir(path, dtype, mesh, fsdp)
        return model.replace(source=str(source.base_source)) if source.hub else model
    raise CheckpointError(f"{source.base}: not a model directory, a .gguf file, BASE+ADAPTER_DIR or a hub id org/name")


def model_max_positions(src: str | Path | ModelSource) -> int | None:
    """The ``max_position_embeddings`` of the model at ``src`` (any `ModelSource`; adapters do not
    change it), read from its config alone, without loading weights; None when ``src`` is none of
    these (loading it reports why). A hub id is resolved (from the cache, or downloaded) here."""
    from hcnr_jax.config import config_from_hf

    source = ModelSource.parse(src)
    path = base_path(source)
    if source.is_gguf and path.is_file():
        from hcnr_jax.conversion.gguf import read_gguf_config

        hf = read_gguf_config(path)
    elif path.is_dir() and (path / "config.json").is_file():
        hf = hf_io.read_config(path)
    else:
        return None
    return config_from_hf(hf, source=str(path)).max_position_embeddings


def resolve_max_length(sources: list[str | Path], max_length: int, explicit: bool, flag: str = "--max-length") -> int:
    """``max_length`` checked against the models' positions (before anything is loaded): above the
    smallest ``max_position_embeddings`` it is an error naming both numbers when the user chose it
    (``explicit``), else (a default) it is lowered to that limit."""
    limits = [(n, str(s)) for s in sources if (n := model_max_positions(s)) is not None]
    if not limits:
        return max_length
    limit, src = min(limits)
    if max_length <= limit:
        return max_length
    if explicit:
        raise HcnrError(f"max_length={max_length} exceeds max_position_embeddings={limit} of {src} (positions "
                        f"beyond the model's); use {flag} {limit} or less")
    log.info("max_length %d (the default) exceeds max_position_embeddings=%d of %s; using %d",
             max_length, limit, src, limit)
    return limit


def save_pretrained(
    model: Pretrained,
    out_dir: str | Path,
    max_shard_bytes: int = hf_io.DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    allow_nonfinite: bool = False,
) -> Path:
    """Write ``model`` as a HF directory that ``transformers`` loads.

    Tensors keep their names, shapes and dtypes (no silent upcast). The directory is written
    under a temporary name and moved into place only once complete. ``extra_files``: name ->
    text written beside the model (reports). A parameter holding NaN or infinite values is a
    `CheckpointError` naming it, raised before anything is written, unless ``allow_nonfinite``.
    """
    specs = param_specs(model.config)
    flat = flatten(model.params)
    if set(flat) != set(specs):
        raise CheckpointError(f"params do not match the config: {sorted(set(flat) ^ set(specs))[:5]}")
    dtypes = {hf_io.dtype_name(leaf.dtype) for leaf in flat.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"mixed parameter dtypes {sorted(dtypes)}; cast to one dtype first")
    if not allow_nonfinite:
        for n in specs:  # on the device, one scalar per tensor back
            if not bool(jnp.all(jnp.isfinite(flat[n]))):
                bad = int(np.count_nonzero(~np.isfinite(np.asarray(flat[n]))))
                raise hf_io.nonfinite_error(n, bad, out_dir)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        # allow_nonfinite: checked above, without a second pass over the host copies.
        hf_io.write_weights({n: flat[n] for n in specs}, tmp, max_shard_bytes, allow_nonfinite=True)
        config = hf_io.config_with_dtype(hf_io.with_legacy_rope(model.hf_config), dtypes.pop())
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, path in model.carried.items():
            shutil.copyfile(path, tmp / name)
        if "generation_config.json" not in model.carried and model.generation_config:
            (tmp / "generation_config.json").write_text(json.dumps(model.generation_config, indent=2) + "\n")
        if model.tokenizer is not None and not any(n.startswith("tokenizer") for n in model.carried):
            model.tokenizer.save_pretrained(str(tmp))
            _name_tokenizer_for_both(tmp / "tokenizer_config.json")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out_dir)


# Tokenizer classes transformers 5 writes that 4.x does not know -> the class both load the same
# tokenizer.json with (5.x keeps PreTrainedTokenizerFast as a name of its TokenizersBackend).
_TOKENIZER_CLASS_FOR_BOTH = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _name_tokenizer_for_both(path: Path) -> None:
    """Rewrite ``tokenizer_class`` in the tokenizer_config.json at ``path`` so that transformers 4.57
    and 5.x both load the tokenizer (only a class name 4.x lacks is changed)."""
    if not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") in _TOKENIZER_CLASS_FOR_BOTH:
        cfg["tokenizer_class"] = _TOKENIZER_CLASS_FOR_BOTH[cfg["tokenizer_class"]]
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@partial(jax.jit, static_argnums=1)
def _logits(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
            positions: jax.Array | None) -> jax.Array:
    return forward(params, cfg, input_ids, attention_mask, positions).logits


def logits(model: Pretrained, input_ids: Any, attention_mask: Any = None, positions: Any = None) -> jax.Array:
    """Float32 logits ``[B, T, V]`` for ``input_ids [B, T]`` (padding marked by ``attention_mask``)."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, bool)
    attention_mask = jnp.asarray(attention_mask).reshape(input_ids.shape)
    if positions is not None:
        positions = jnp.asarray(positions, jnp.int32).reshape(input_ids.shape)
    return _logits(model.params, model.config, input_ids, attention_mask, positions)
