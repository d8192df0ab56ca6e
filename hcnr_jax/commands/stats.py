"""`hcnr stats --model SRC --data FILE --kind fisher|hessian --out DIR`: the statistics HCNR uses,
written as safetensors keyed by Hugging Face weight name (loadable with `safetensors.torch`)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from hcnr_jax.stats.output import KINDS

if TYPE_CHECKING:
    from hcnr_jax.stats import StatsOptions

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
                        "was checked (kernels/backend.py VERIFIED) [auto]")
    from hcnr_jax.commands.repair import add_memory_flags

    add_memory_flags(p)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> StatsOptions:
    """Reject bad settings before anything slow runs (errors name the option); resolve --max-length.
    Returns how the statistics run."""
    from hcnr_jax.commands.cache import check_flags
    from hcnr_jax.errors import HcnrError
    from hcnr_jax.pretrained import resolve_max_length
    from hcnr_jax.sharding import mesh_from_flag
    from hcnr_jax.stats import StatsOptions

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
    mesh = mesh_from_flag(args.mesh)
    check_flags(args)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise HcnrError(f"{out}: output directory already exists (choose another path or pass --overwrite)")
    args.max_length = resolve_max_length([args.model], args.max_length or DEFAULT_MAX_LENGTH,
                                         explicit=args.max_length is not None)
    from hcnr_jax.commands.repair import remat_of

    return StatsOptions(batch_size=args.batch_size, backend=args.backend, remat=remat_of(args), mesh=mesh, fsdp=args.fsdp,
                        cache_dir=args.cache_dir, checkpoint_every=args.checkpoint_every,
                        progress=not args.no_progress, lock_timeout=args.lock_timeout)


def run(args: argparse.Namespace) -> int:
    from hcnr_jax import user_cache
    from hcnr_jax.commands.cache import run_folder, say_kept
    from hcnr_jax.stats.output import compute_file_statistic, write_file_statistic

    options = _check(args)
    identity = {"model": user_cache.source_identity(args.model),
                "data": user_cache.file_identity(args.data) if Path(args.data).is_file() else str(args.data),
                **{k: getattr(args, k) for k in ("kind", "neuron_axis", "batch_size", "max_length", "limit",
                                                 "mesh", "fsdp", "backend")}}
    # The checkpoints live in the user cache's run folder, so Ctrl-C or a crash loses nothing and the
    # same command resumes; the folder goes once --out is written (the result is there).
    with run_folder(args, "stats", identity, f"hcnr stats --kind {args.kind} --model {args.model} --data "
                    f"{args.data}") as run:
        if run is not None:
            options = dataclasses.replace(options, cache_dir=str(run.path))
        result, record = compute_file_statistic(
            args.model, args.data, args.kind, options, neuron_axis=args.neuron_axis, dedupe=args.dedupe,
            max_length=args.max_length, limit=args.limit, mesh_spec=args.mesh)
        print(write_file_statistic(result, record, args.out, args.kind, overwrite=args.overwrite))
    say_kept(run)
    return 0
