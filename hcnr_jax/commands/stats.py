"""`hcnr stats --model SRC --data FILE --kind fisher|hessian --out DIR`: the statistics HCNR uses,
written as safetensors keyed by Hugging Face weight name (loadable with `safetensors.torch`)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("fisher", "hessian")
DEFAULT_MAX_LENGTH = 512

DESCRIPTION = """\
Compute per-neuron Fisher importance or layer-input Hessians of every linear weight of the
transformer blocks (q/k/v/o/gate/up/down) on a JSONL file of samples ({"prompt", "response"} or
{"input_ids", "loss_mask"}), and write DIR/<kind>.safetensors (float32, keyed by HF weight name,
e.g. model.layers.3.mlp.down_proj.weight) and DIR/stats.json (settings, data sha256, counts, wall
time of the accumulation including compilation, samples/s).

fisher:  [n_neurons] per weight, the mean over samples of the per-sample squared gradient norm of
         each neuron (input column W[:, k], or output row W[k, :] with --neuron-axis output); a
         sample's loss is its mean cross-entropy over its loss-masked tokens.
hessian: [in, in] per weight, sum of x x^T of the layer's input over every non-padding token.
         Layers that read the same input have equal matrices: k_proj and v_proj equal q_proj,
         up_proj equals gate_proj. By default every weight name gets its own (duplicated) entry;
         --dedupe writes only q_proj and gate_proj and lists the aliases in stats.json and in the
         safetensors metadata ("aliases").
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="Fisher importance or layer-input Hessians of a model on JSONL samples",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model directory, .gguf file, hub id org/name[@revision], or BASE+ADAPTER_DIR (PEFT LoRA)")
    p.add_argument("--data", required=True, help="JSONL samples: prompt/response or input_ids/loss_mask")
    p.add_argument("--kind", required=True, choices=KINDS, help="which statistic")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--neuron-axis", choices=("input", "output"), default=None,
                   help="fisher only: neurons are input columns or output rows [input]")
    p.add_argument("--dedupe", action="store_true",
                   help="hessian only: write q_proj/gate_proj only (k/v_proj and up_proj are equal to them)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,model=4 [all devices on data]")
    p.add_argument("--fsdp", action="store_true", help="also split weights over the data axis")
    p.add_argument("--batch-size", type=int, default=8, help="samples per step [8]")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"tokens per sample, longer ones are cut [{DEFAULT_MAX_LENGTH}, or the model's "
                        "max_position_embeddings if smaller]")
    p.add_argument("--limit", type=int, default=None, help="use the first N samples [all]")
    p.add_argument("--cache-dir", default=None,
                   help="reuse results for identical weights, data and settings; checkpoints go here too; kept "
                        "(default: checkpoints in the user cache, removed once --out is written)")
    p.add_argument("--lock-timeout", type=float, default=None, metavar="SECONDS",
                   help="with --cache-dir: how long to wait for another run computing the same entry, then "
                        "fail (0: fail at once) [3600]")
    p.add_argument("--checkpoint-every", type=int, default=16,
                   help="save the accumulators every N batches, so a killed run resumes (Ctrl-C saves at once) [16]")
    from hcnr_jax.commands.cache import add_flags

    add_flags(p, "statistics checkpoints")
    p.add_argument("--backend", choices=("auto", "pallas", "reference"), default="auto",
                   help="Pallas kernels or jax.numpy; auto: Pallas only on a platform where the kernel "
                        "was checked (kernels/fisher_norms.py VERIFIED) [auto]")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    """Reject bad settings before anything slow runs (errors name the option); resolve --max-length."""
    from hcnr_jax.errors import HcnrError
    from hcnr_jax.sharding import parse_mesh

    if args.kind != "fisher" and args.neuron_axis is not None:
        raise HcnrError("--neuron-axis applies to --kind fisher only")
    if args.kind != "hessian" and args.dedupe:
        raise HcnrError("--dedupe applies to --kind hessian only")
    for opt in ("batch_size", "max_length", "limit", "checkpoint_every"):
        v = getattr(args, opt)
        if v is not None and v < (0 if opt == "checkpoint_every" else 1):
            raise HcnrError(f"--{opt.replace('_', '-')} must be positive, got {v}")
    if args.lock_timeout is not None and not args.lock_timeout >= 0:
        raise HcnrError(f"--lock-timeout must be >= 0 seconds, got {args.lock_timeout}")
    parse_mesh(args.mesh)
    from hcnr_jax.commands.cache import check_flags

    check_flags(args)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise HcnrError(f"{out}: output directory already exists (choose another path or pass --overwrite)")
    from hcnr_jax.pretrained import resolve_max_length

    args.max_length = resolve_max_length([args.model], args.max_length or DEFAULT_MAX_LENGTH,
                                         explicit=args.max_length is not None)


def compute(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(HF name -> float32 array, the stats.json record) for parsed ``args``; writes nothing
    (except checkpoints and cache entries under ``--cache-dir``)."""
    from hcnr_jax import __version__, preflight, stats
    from hcnr_jax.data import load_samples
    from hcnr_jax.io import sha256_file
    from hcnr_jax.pretrained import load_pretrained
    from hcnr_jax.sharding import make_mesh
    from hcnr_jax.stats.hessian_accum import groups

    # The whole data file, then the model's configs, then its ids against the vocabulary: before any weight.
    preflight.check_data_files([args.data])
    preflight.check_data_files([args.data], vocab_size=preflight.model_config(args.model).vocab_size)
    mesh = make_mesh(args.mesh)
    # Loaded straight into the shardings the statistics step uses (nothing is resharded after).
    model = load_pretrained(args.model, mesh=mesh, fsdp=args.fsdp)
    cfg = model.config
    samples = load_samples(args.data, model.tokenizer, max_length=args.max_length, limit=args.limit,
                           vocab_size=cfg.vocab_size)
    opts = dict(batch_size=args.batch_size, backend=args.backend, mesh=mesh, fsdp=args.fsdp,
                cache_dir=args.cache_dir, checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
                lock_timeout=args.lock_timeout)
    axis = args.neuron_axis or "input"
    t0 = time.perf_counter()
    if args.kind == "fisher":
        result = stats.fisher(model.params, cfg, samples, neuron_axis=axis, **opts)
    else:
        result = stats.hessian(model.params, cfg, samples, **opts)
    wall = time.perf_counter() - t0
    aliases: dict[str, str] = {}
    if args.kind == "hessian" and args.dedupe:
        aliases = {m: owner for owner, members in groups(cfg).items() for m in members if m != owner}
        result = {k: v for k, v in result.items() if k not in aliases}
    settings = {"kind": args.kind, "batch_size": args.batch_size, "max_length": args.max_length,
                "limit": args.limit, "mesh": args.mesh, "fsdp": args.fsdp, "backend": args.backend}
    if args.kind == "fisher":
        settings["neuron_axis"] = axis
        settings["reduction"] = "mean over samples of per-sample squared gradient norms"
    else:
        settings["dedupe"] = args.dedupe
        settings["reduction"] = "sum over non-padding tokens of x x^T"
    record = {
        "hcnr_jax_version": __version__,
        "model": str(args.model),
        "data": str(args.data),
        "data_file_sha256": sha256_file(args.data),
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


def run(args: argparse.Namespace) -> int:
    _check(args)
    from hcnr_jax import cache
    from hcnr_jax.commands.cache import report, run_folder

    identity = {"model": cache.source_identity(args.model),
                "data": cache.file_identity(args.data) if Path(args.data).is_file() else str(args.data),
                **{k: getattr(args, k) for k in ("kind", "neuron_axis", "batch_size", "max_length", "limit",
                                                 "mesh", "fsdp", "backend")}}
    # The checkpoints live in the user cache's run folder, so Ctrl-C or a crash loses nothing and the
    # same command resumes; the folder goes once --out is written (the result is there).
    with run_folder(args, "stats", identity, f"hcnr stats --kind {args.kind} --model {args.model} --data "
                    f"{args.data}") as run:
        if run is not None:
            args.cache_dir = str(run.path)
        _compute_and_write(args)
    report(run)
    return 0


def _compute_and_write(args: argparse.Namespace) -> None:
    from safetensors.numpy import save_file

    from hcnr_jax.io import atomic_output_dir, atomic_write_text, check_finite_tensors, strict_json

    result, record = compute(args)
    # Checked before anything is written: a NaN or infinity never reaches the output.
    check_finite_tensors(result, Path(args.out) / f"{args.kind}.safetensors")
    record_json = strict_json(record, Path(args.out) / "stats.json", indent=2) + "\n"
    meta = {"format": "pt", "kind": args.kind, "data_file_sha256": record["data_file_sha256"],
            "num_samples": str(record["num_samples"]), "settings": json.dumps(record["settings"]),
            "aliases": json.dumps(record["aliases"])}
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        # Shared (q/k/v, gate/up) arrays are copied: every entry owns its buffer in the file.
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in sorted(result.items())},
                  str(tmp / f"{args.kind}.safetensors"), metadata=meta)
        atomic_write_text(tmp / "stats.json", record_json)
    print(f"wrote {args.out}/{args.kind}.safetensors ({record['num_tensors']} tensors) and stats.json: "
          f"{record['num_samples']} samples, {record['num_tokens']} tokens in {record['wall_time_s']:.1f}s "
          f"({record['samples_per_s']} samples/s)")
