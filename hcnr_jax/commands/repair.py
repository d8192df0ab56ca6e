"""`hcnr repair`: write the HCNR-repaired fine-tuned model, with its report and plots."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from hcnr_jax.errors import HcnrError
from hcnr_jax.repair.config import (
    CALIB_DATA,
    LAYER_BUDGETS,
    LAYER_UNITS,
    MODELS,
    NEURON_AXES,
    PRIORITIES,
    RepairConfig,
)

if TYPE_CHECKING:
    from hcnr_jax.stats import StatsOptions

# RepairConfig fields settable by flag (--r-iw for r_iw, ...): help text and choices. The shown
# defaults are read from RepairConfig, so help and behaviour cannot drift apart.
SETTINGS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "r_iw": ("fraction of neurons per layer that are candidates", None),
    "r_cw": ("fraction of layers kept", None),
    "solver": ("compensation solver: exact, paper, none, cg, or module:name", None),
    "priority": ("neuron priority", PRIORITIES),
    "layer_unit": ("what a layer is", LAYER_UNITS),
    "layer_budget": ("r_cw counts layers or parameters", LAYER_BUDGETS),
    "neuron_axis": ("neurons are columns (input) or rows (output)", NEURON_AXES),
    "fisher_hon_model": ("model the honesty Fisher is taken on", MODELS),
    "fisher_task_model": ("model the task Fisher is taken on", MODELS),
    "calib_data": ("data whose layer inputs give H = X^T X", CALIB_DATA),
    "calib_model": ("model those inputs run through", MODELS),
    "damping": ("lambda of H + lambda mean(diag H) I", None),
    "seed": ("seed of priority=random", None),
    "max_length": ("tokens per sample", None),
    "batch_size": ("statistics batch size", None),
    "limit": ("use the first N samples of each data file", None),
    "hessian_passes": ("passes over the calibration data for the Hessians, each holding a share of the kept "
                       "layers' accumulators (less device memory)", None),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "repair", help="repair a fine-tuned model's honesty with HCNR (training-free)",
        description="Restore honesty-critical neurons of FINETUNED from BASE and compensate the rest. "
                    "Settings: defaults (docs/method.md) <- --config YAML <- flags.")
    p.add_argument("--base", required=True, help="the model before fine-tuning (HF dir, .gguf, BASE+ADAPTER)")
    p.add_argument("--finetuned", required=True, help="the fine-tuned model (HF dir, .gguf, BASE+ADAPTER)")
    p.add_argument("--honesty-data", default=None, help="JSONL honesty samples (default: bundled, 128)")
    p.add_argument("--task-data", default=None, help="JSONL task samples (default: bundled, 128)")
    p.add_argument("--out", required=True, help="output HF directory (must not exist unless --overwrite)")
    p.add_argument("--config", default=None, help="YAML file of repair settings, or the name of a shipped one (hcnr_default, hcnr_block_cg, hcnr_paper_ablation_no_compensation)")
    defaults = RepairConfig()
    for name, (text, choices) in SETTINGS.items():
        default = getattr(defaults, name)
        p.add_argument("--" + name.replace("_", "-"), type=int if default is None else type(default),
                       choices=choices, default=None, help=f"{text} [{'all' if default is None else default}]")
    p.add_argument("--baseline", choices=list(BASELINES), default=None,
                   help="a training-free baseline through the same pipeline: 'layers' restores the kept layers "
                        "whole (r_iw 1, solver none: no neuron selection, nothing compensated); random neurons at "
                        "HCNR's budget are --priority random")
    p.add_argument("--choose", default=None, metavar="r_cw=V,V,...",
                   help="repair at each value of one setting (r_cw, r_iw or damping) and keep the one the "
                        "development rule chooses (docs/method.md: the best honesty log-likelihood on "
                        "--dev-honesty among values keeping half of the fine-tune's task gain on --dev-task)")
    p.add_argument("--dev-honesty", default=None, metavar="FILE",
                   help="with --choose: development honesty samples (`hcnr calib --split development`)")
    p.add_argument("--dev-task", default=None, metavar="FILE", help="with --choose: development task samples")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="dtype of the written weights; the statistics and the solve are float32 whatever it is "
                        "[the fine-tuned input's float type; bfloat16 for a quantised GGUF, which has none]")
    p.add_argument("--cache-dir", default=None,
                   help="keep statistics in this folder and reuse them (default: the user cache, removed once "
                        "--out is written)")
    from hcnr_jax.commands.cache import add_flags

    add_flags(p, "statistics")
    p.add_argument("--lock-timeout", type=float, default=None, metavar="SECONDS",
                   help="with --cache-dir: how long to wait for another run computing the same statistic, then "
                        "fail (0: fail at once) [3600]")
    p.add_argument("--mesh", default=None,
                   help="device mesh, e.g. data=2,model=4: models loaded onto it, statistics and solves sharded by "
                        "weight role [all devices on data]")
    p.add_argument("--fsdp", action="store_true", help="with --mesh: also split weights over the data axis")
    add_memory_flags(p)
    p.add_argument("--no-offload", action="store_true",
                   help="keep both models in memory throughout (by default, while a statistics pass runs on one "
                        "model, the other waits in host memory, or on a CPU in files of the statistics folder)")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would change and each step's compiled memory and FLOPs per device "
                        "(compiles, computes nothing, writes nothing)")
    p.set_defaults(func=run)


def add_memory_flags(p: argparse.ArgumentParser) -> None:
    """``--remat``, shared by the commands that take a Fisher (repair, stats)."""
    p.add_argument("--remat", choices=("on", "off"), default="on",
                   help="recompute each block in the Fisher's backward pass: one block's activations live instead "
                        "of all, for one more forward pass (SmolLM2 on a CPU: a sixth of the step's temporaries at "
                        "96 tokens, a fourteenth at 512, for about a fifth more Fisher time); off keeps every "
                        "block's activations [on]")


def remat_of(args: argparse.Namespace) -> bool:
    """``StatsOptions.remat`` from ``--remat``."""
    return args.remat == "on"


# --baseline NAME: the settings it stands for (a flag that contradicts them is an error).
BASELINES: dict[str, dict[str, object]] = {"layers": {"r_iw": 1.0, "solver": "none"}}
CHOOSABLE = ("r_cw", "r_iw", "damping")


def _overrides(args: argparse.Namespace) -> dict:
    out = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}
    for k, v in BASELINES.get(args.baseline or "", {}).items():
        if k in out and out[k] != v:
            raise HcnrError(f"--baseline {args.baseline} sets --{k.replace('_', '-')} {v}; "
                            f"got --{k.replace('_', '-')} {out[k]}")
        out[k] = v
    return out


def _choice_args(args: argparse.Namespace) -> tuple[str, list[float]] | None:
    """``(setting, values)`` of --choose, checked before anything is loaded; None without it."""
    from hcnr_jax.repair.choose import parse_candidates

    if args.choose is None:
        if args.dev_honesty or args.dev_task:
            raise HcnrError("--dev-honesty / --dev-task are used only with --choose")
        return None
    name, sep, values = args.choose.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or name not in CHOOSABLE:
        raise HcnrError(f"--choose {args.choose!r}: expected SETTING=V,V,... with SETTING one of {', '.join(CHOOSABLE)}")
    if getattr(args, name) is not None:
        raise HcnrError(f"--choose {name}=... and --{name.replace('_', '-')} both given: choose one")
    if not (args.dev_honesty and args.dev_task):
        raise HcnrError("--choose needs --dev-honesty and --dev-task (development data, never evaluation data)")
    for f in (args.dev_honesty, args.dev_task):
        if not Path(f).is_file():
            raise HcnrError(f"{f}: no such data file")
    return name, parse_candidates(values, f"--choose {name}")


def run(args: argparse.Namespace) -> int:
    from hcnr_jax import plan
    from hcnr_jax.commands.cache import check_flags
    from hcnr_jax.io import check_output_apart
    from hcnr_jax.preflight import check_pair_inputs
    from hcnr_jax.pretrained import resolve_max_length
    from hcnr_jax.repair.config import load_config
    from hcnr_jax.settings import user_set
    from hcnr_jax.sharding import mesh_from_flag
    from hcnr_jax.stats import StatsOptions

    logging.getLogger("hcnr_jax.repair").setLevel(logging.INFO)
    if args.lock_timeout is not None and not args.lock_timeout >= 0:
        raise HcnrError(f"--lock-timeout must be >= 0 seconds, got {args.lock_timeout}")
    check_flags(args)
    mesh = mesh_from_flag(args.mesh)
    choice_of = _choice_args(args)
    cfg = load_config(args.config, **_overrides(args))
    if choice_of:  # every candidate value must be valid before anything is loaded
        for v in choice_of[1]:
            cfg.override(**{choice_of[0]: v})
    # Settings are checked; now the output path: --overwrite replaces --out as a whole, so it must
    # neither be, sit inside nor contain an input model.
    check_output_apart(args.out, [("--base", args.base), ("--finetuned", args.finetuned)], replaces=True)
    out = Path(args.out)
    if out.exists() and not args.overwrite and not args.dry_run:
        raise HcnrError(f"{out}: output directory already exists (choose another path or pass --overwrite)")
    # Every data file (the bundled ones need no check), then the models' configs, before any weight.
    check_pair_inputs(args.base, args.finetuned, (args.honesty_data, args.task_data, args.dev_honesty, args.dev_task))
    max_length = resolve_max_length([args.base, args.finetuned], cfg.max_length, user_set("max_length", args.max_length, args.config))
    if max_length != cfg.max_length:
        cfg = cfg.override(max_length=max_length)
    if args.dry_run:
        return _dry_run(args, cfg, out)
    cfg, fitted = plan.fit_to_device(
        args.finetuned, cfg, mesh_spec=args.mesh, fsdp=args.fsdp,
        batch_fixed=user_set("batch_size", args.batch_size, args.config),
        passes_fixed=user_set("hessian_passes", args.hessian_passes, args.config), offload_idle=not args.no_offload)
    if fitted:
        print(f"hcnr repair: {fitted}", flush=True)
    return _repair_and_write(args, cfg, StatsOptions(mesh=mesh, fsdp=args.fsdp, remat=remat_of(args)), choice_of, out)


def _dry_run(args: argparse.Namespace, cfg: RepairConfig, out: Path) -> int:
    from hcnr_jax import plan
    from hcnr_jax.repair.pipeline import load

    state = load(args.base, args.finetuned, args.honesty_data, args.task_data, cfg)
    dry = plan.repair_dry_run(state.finetuned, cfg, state.honesty, state.task, mesh_spec=args.mesh, fsdp=args.fsdp,
                              offload_idle=not args.no_offload)
    print(json.dumps({"settings": cfg.to_dict(), "data": state.data, "plan": dry, "out": str(out)}, indent=2))
    print(plan.describe_dry_run(dry))
    return 0


def _repair_and_write(args: argparse.Namespace, cfg: RepairConfig, options: StatsOptions,
                      choice_of: tuple[str, list[float]] | None, out: Path) -> int:
    from hcnr_jax import user_cache
    from hcnr_jax.commands.cache import run_folder, say_kept
    from hcnr_jax.repair.choose import repair_choosing
    from hcnr_jax.repair.output import closing_lines, output_dtype
    from hcnr_jax.repair.pipeline import repair, write_repair
    from hcnr_jax.source import ModelSource

    if args.cache_dir:
        options = dataclasses.replace(options, cache_dir=args.cache_dir, lock_timeout=args.lock_timeout)
    gguf = ModelSource.parse(args.finetuned).is_gguf
    dtype, why = output_dtype(args.dtype, args.finetuned) if args.dtype or gguf else (None, "")
    identity = {"base": user_cache.source_identity(args.base),
                "finetuned": user_cache.source_identity(args.finetuned),
                **{k: user_cache.file_identity(getattr(args, k))
                   for k in ("honesty_data", "task_data", "dev_honesty", "dev_task")},
                "settings": cfg.to_dict(), "choose": args.choose}
    # Statistics go to the user cache's run folder: Ctrl-C or a crash keeps them and the same command
    # resumes; the folder goes once --out is written (an 8B model's Hessians are tens of GB).
    with run_folder(args, "repair", identity, f"hcnr repair --finetuned {args.finetuned} --out {out}") as run:
        if run is not None:
            options = dataclasses.replace(options, cache_dir=str(run.path), lock_timeout=args.lock_timeout)
        if choice_of:
            result = repair_choosing(args.base, args.finetuned, args.honesty_data, args.task_data, cfg, *choice_of,
                                     args.dev_honesty, args.dev_task, options)
        else:
            result = repair(args.base, args.finetuned, args.honesty_data, args.task_data, cfg,
                            stats_options=options, offload_idle=not args.no_offload)
        if dtype is None:
            dtype, why = output_dtype(None, args.finetuned, result.model)
        result.report["output"] = {"dtype": dtype, "dtype_from": why}
        write_repair(result, out, plots=not args.no_plots, overwrite=args.overwrite, dtype=dtype)
    say_kept(run)
    print("\n".join(closing_lines(result.report, out, dtype, why, args.finetuned)))
    return 0
