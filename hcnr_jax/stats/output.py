"""``hcnr stats``'s output: a statistic of a model on a JSONL file, written as ``DIR/<kind>.safetensors``
(float32, keyed by HF weight name, loadable with ``safetensors.torch``) and ``DIR/stats.json``
(settings, data sha256, counts, wall time of the accumulation including compilation, samples/s).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from hcnr_jax.stats.options import StatsOptions

KINDS = ("fisher", "hessian")


def compute_file_statistic(model_src: str, data: str, kind: str, options: StatsOptions, *,
                           neuron_axis: str | None = None, dedupe: bool = False, max_length: int = 512,
                           limit: int | None = None, mesh_spec: str | None = None
                           ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(HF name -> float32 array, the stats.json record) of statistic ``kind`` of ``model_src`` on
    the JSONL file ``data``; writes nothing (except checkpoints and entries in ``options.cache_dir``).

    The whole data file, then the model's configs, then its token ids against the vocabulary are
    checked before any weight is read. The model is loaded straight into the shardings the
    statistics step uses (``options.mesh``, else every device on ``data``). ``dedupe`` (hessian):
    only one entry per shared input (q_proj, gate_proj), the others listed as ``aliases``.
    ``mesh_spec``: the mesh as the user wrote it, for the record."""
    from hcnr_jax import __version__, preflight, stats
    from hcnr_jax.data.samples import load_samples
    from hcnr_jax.io import sha256_file
    from hcnr_jax.pretrained import load_pretrained
    from hcnr_jax.sharding import make_mesh
    from hcnr_jax.stats.hessian_accum import groups

    preflight.check_data_files([data])
    preflight.check_data_files([data], vocab_size=preflight.model_config(model_src).vocab_size)
    # Loaded straight into the shardings the statistics step uses (nothing is resharded after).
    options = dataclasses.replace(options, mesh=options.mesh if options.mesh is not None else make_mesh())
    model = load_pretrained(model_src, mesh=options.mesh, fsdp=options.fsdp)
    cfg = model.config
    samples = load_samples(data, model.tokenizer, max_length=max_length, limit=limit, vocab_size=cfg.vocab_size)
    axis = neuron_axis or "input"
    t0 = time.perf_counter()
    if kind == "fisher":
        result = stats.fisher(model.params, cfg, samples, options, neuron_axis=axis)
    else:
        result = stats.hessian(model.params, cfg, samples, options)
    wall = time.perf_counter() - t0
    aliases: dict[str, str] = {}
    if kind == "hessian" and dedupe:
        aliases = {m: owner for owner, members in groups(cfg).items() for m in members if m != owner}
        result = {k: v for k, v in result.items() if k not in aliases}
    settings = {"kind": kind, "batch_size": options.batch_size, "max_length": max_length, "limit": limit,
                "mesh": mesh_spec, "fsdp": options.fsdp, "backend": options.backend}
    if kind == "fisher":
        settings["neuron_axis"] = axis
        settings["reduction"] = "mean over samples of per-sample squared gradient norms"
    else:
        settings["dedupe"] = dedupe
        settings["reduction"] = "sum over non-padding tokens of x x^T"
    record = {
        "hcnr_jax_version": __version__,
        "model": str(model_src),
        "data": str(data),
        "data_file_sha256": sha256_file(data),
        "samples_sha256": samples.sha256,
        "settings": settings,
        "num_samples": len(samples),
        "num_tokens": samples.num_tokens,
        "num_target_tokens": int(samples.loss_mask.sum()),
        "num_tensors": len(result),
        "aliases": aliases,
        "wall_time_s": round(wall, 3),  # the accumulation, compilation included; model loading excluded
        "samples_per_s": round(len(samples) / wall, 3) if wall > 0 else None,
    }
    return result, record


def write_file_statistic(result: dict[str, np.ndarray], record: dict[str, Any], out: str | Path, kind: str, *,
                         overwrite: bool = False) -> str:
    """Write ``out/<kind>.safetensors`` and ``out/stats.json`` atomically (the folder appears
    whole); returns the line saying what was written. A NaN or infinity is refused before anything
    is written."""
    from safetensors.numpy import save_file

    from hcnr_jax.io import atomic_output_dir, atomic_write_text, check_finite_tensors, strict_json

    check_finite_tensors(result, Path(out) / f"{kind}.safetensors")
    record_json = strict_json(record, Path(out) / "stats.json", indent=2) + "\n"
    meta = {"format": "pt", "kind": kind, "data_file_sha256": record["data_file_sha256"],
            "num_samples": str(record["num_samples"]), "settings": json.dumps(record["settings"]),
            "aliases": json.dumps(record["aliases"])}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        # Shared (q/k/v, gate/up) arrays are copied: every entry owns its buffer in the file.
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in sorted(result.items())},
                  str(tmp / f"{kind}.safetensors"), metadata=meta)
        atomic_write_text(tmp / "stats.json", record_json)
    return (f"wrote {out}/{kind}.safetensors ({record['num_tensors']} tensors) and stats.json: "
            f"{record['num_samples']} samples, {record['num_tokens']} tokens in {record['wall_time_s']:.1f}s "
            f"({record['samples_per_s']} samples/s)")


__all__ = ["KINDS", "compute_file_statistic", "write_file_statistic"]
