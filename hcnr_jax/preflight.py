"""Checks every command runs before it reads a weight, in this order: settings, output paths (each
command's own), every data file (whole, errors naming the line), the models' configs, each on its
own (`schema`) and against each other (sizes by name), and only then the weights. A bad input found
after minutes of loading a large model would cost those minutes; found here, it costs a second.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hcnr_jax.config import ModelConfig, config_from_hf
from hcnr_jax.errors import CheckpointError
from hcnr_jax.source import ModelSource

# ModelConfig field -> the config.json name users know it by.
HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads", "local_rope_theta": "rope_local_base_freq"}


def model_config(src: str | Path | ModelSource) -> ModelConfig:
    """The architecture of the model at ``src`` from its small files alone: ``config.json`` (or a
    GGUF header), ``tokenizer.json`` and each adapter's ``adapter_config.json``, every field
    checked (`hcnr_jax.schema`). No weight is read; a hub id is resolved (cache, or download)."""
    from hcnr_jax.conversion import hf as hf_io
    from hcnr_jax.conversion.lora import read_adapter_config
    from hcnr_jax.pretrained import base_path, check_tokenizer_files

    source = ModelSource.parse(src)
    path = base_path(source)
    if source.is_gguf and path.is_file():
        from hcnr_jax.conversion.gguf import read_gguf_config

        hf, where = read_gguf_config(path), str(path)
    elif path.is_dir():
        hf, where = hf_io.read_config(path), str(path / "config.json")
    else:
        raise CheckpointError(f"{source.base}: not a model directory, a .gguf file, BASE+ADAPTER_DIR or a hub id "
                              "org/name")
    cfg = config_from_hf(hf, source=where)
    if path.is_dir():
        check_tokenizer_files(path)
    for adapter in source.adapters:
        read_adapter_config(Path(adapter))
    return cfg


def differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """``["hidden_size 576 vs 64", ...]``: the fields in which ``a`` and ``b`` differ, in config order."""
    return [f"{HF_NAMES.get(f.name, f.name)} {_shown(getattr(a, f.name))} vs {_shown(getattr(b, f.name))}"
            for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def _shown(value: Any) -> str:
    if isinstance(value, tuple) and len(set(value)) == 1 and len(value) > 3:
        return f"({value[0]!r},) * {len(value)}"  # per-layer windows: one value repeated
    return str(value)


def check_same_architecture(models: Iterable[tuple[str, str | Path, ModelConfig]]) -> None:
    """Models that must share one architecture (base and fine-tuned: ``(what, source, config)``
    triples) compared field by field; the first pair that differs is a `CheckpointError` naming
    both models and every differing field, ``model_type`` first."""
    (what_a, src_a, a), *rest = list(models)
    for what_b, src_b, b in rest:
        diff = differences(a, b)
        if diff:
            kind = "architectures" if a.model_type != b.model_type else "configurations"
            raise CheckpointError(f"{what_a} {src_a} vs {what_b} {src_b}: {kind} differ: {', '.join(diff)}")


def check_models(models: Iterable[tuple[str, str | Path | None]], *, same: bool = False) -> dict[str, ModelConfig]:
    """Each model's configs checked (`model_config`; None sources skipped), and, when ``same``,
    compared with each other (`check_same_architecture`). Returns ``{what: config}``."""
    configs = {what: model_config(src) for what, src in models if src is not None}
    if same:
        check_same_architecture((what, src, configs[what]) for what, src in models if src is not None)
    return configs


def check_data_files(paths: Iterable[str | Path | None], *, vocab_size: int | None = None,
                     pairs: bool = False) -> None:
    """Every line of each data file (None paths skipped) checked without a tokenizer: UTF-8, JSON,
    an object of one of the line formats (``pairs``: preference pairs) with values of the right
    types, token ids inside ``vocab_size``. Errors are `DataError` naming the file and the line."""
    from hcnr_jax.data.jsonl import read_jsonl
    from hcnr_jax.data.samples import check_record

    for path in paths:
        if path is None:
            continue
        for line, rec in read_jsonl(path):
            check_record(rec, f"{path}:{line}", vocab_size=vocab_size, pairs=pairs)


def check_pair_inputs(base: Any, finetuned: Any, data: Iterable[Any] = (), what: tuple[str, str] = (
        "--base", "--finetuned")) -> dict[str, ModelConfig]:
    """The inputs of a command on a base and its fine-tune (repair, merge), in order: the data files,
    then both models' configs, each and against each other, then the pre-tokenized data's ids
    against the vocabulary. Inputs given as objects (loaded models, `Samples`) are skipped: they
    were checked when made. Returns ``{what: config}`` of the models given as sources."""
    files = [d for d in data if isinstance(d, (str, Path))]
    check_data_files(files)
    sources = [(w, s) for w, s in zip(what, (base, finetuned), strict=True) if isinstance(s, (str, Path, ModelSource))]
    configs = check_models(sources, same=len(sources) == 2)
    if configs:
        check_data_files(files, vocab_size=min(c.vocab_size for c in configs.values()))
    return configs
