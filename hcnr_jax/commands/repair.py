"""`hcnr repair`: write the HCNR-repaired fine-tuned model, with its report and plots."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from hcnr_jax.errors import HcnrError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from hcnr_jax.repair.config import CALIB_DATA, LAYER_BUDGETS, LAYER_UNITS, MODELS, NEURON_AXES, PRIORITIES

    p = sub.add_parser(
        "repair", help="repair a fine-tuned model's honesty with HCNR (training-free)",
        description="Restore honesty-critical neurons of FINETUNED from BASE and compensate the rest. "
                    "Settings: defaults (METHOD.md) <- --config YAML <- flags.")
    p.add_argument("--base", required=True, help="the model before fine-tuning (HF dir, .gguf, BASE+ADAPTER)")
    p.add_argument("--finetuned", required=True, help="the fine-tuned model (HF dir, .gguf, BASE+ADAPTER)")
    p.add_argument("--honesty-data", default=None, help="JSONL honesty samples (default: bundled, 128)")
    p.add_argument("--task-data", default=None, help="JSONL task samples (default: bundled, 128)")
    p.add_argument("--out", required=True, help="output HF directory (must not exist unless --overwrite)")
    p.add_argument("--config", default=None, help="YAML file of repair settings (see configs/)")
    p.add_argument("--r-iw", type=float, default=None, help="fraction of neurons per layer [0.5]")
    p.add_argument("--r-cw", type=float, default=None, help="fraction of layers kept [0.4]")
    p.add_argument("--solver", default=None, help="compensation solver: paper, exact, none, cg, ... [exact]")
    p.add_argument("--priority", choices=PRIORITIES, default=None, help="neuron priority [kl]")
    p.add_argument("--layer-unit", choices=LAYER_UNITS, default=None, help="what a layer is [module]")
    p.add_argument("--layer-budget", choices=LAYER_BUDGETS, default=None, help="r_cw counts layers or params [count]")
    p.add_argument("--neuron-axis", choices=NEURON_AXES, default=None, help="neurons are columns or rows [input]")
    p.add_argument("--fisher-hon-model", choices=MODELS, default=None, help="model for honesty Fisher [orig]")
    p.add_argument("--fisher-task-model", choices=MODELS, default=None, help="model for task Fisher [sft]")
    p.add_argument("--calib-data", choices=CALIB_DATA, default=None, help="data for H = X^T X [hon]")
    p.add_argument("--calib-model", choices=MODELS, default=None, help="model for H = X^T X [sft]")
    p.add_argument("--damping", type=float, default=None, help="lambda of H + lambda mean(diag H) I [0.01]")
    p.add_argument("--seed", type=int, default=None, help="seed of priority=random [0]")
    p.add_argument("--max-length", type=int, default=None, help="tokens per sample [512]")
    p.add_argument("--batch-size", type=int, default=None, help="statistics batch size [8]")
    p.add_argument("--limit", type=int, default=None, help="use the first N samples of each file [all]")
    p.add_argument("--cache-dir", default=None, help="reuse statistics computed before (statistics cache)")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--dry-run", action="store_true", help="print what would change and a memory estimate")
    p.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> dict:
    keys = ("r_iw", "r_cw", "solver", "priority", "layer_unit", "layer_budget", "neuron_axis", "fisher_hon_model",
            "fisher_task_model", "calib_data", "calib_model", "damping", "seed", "max_length", "batch_size", "limit")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def run(args: argparse.Namespace) -> int:
    from hcnr_jax.repair.config import load_config
    from hcnr_jax.repair.pipeline import plan, prepare, repair, write_repair

    logging.getLogger("hcnr_jax.repair").setLevel(logging.INFO)
    cfg = load_config(args.config, **_overrides(args))
    out = Path(args.out)
    if out.exists() and not args.overwrite and not args.dry_run:
        raise HcnrError(f"{out}: output directory already exists (choose another path or pass --overwrite)")
    if args.dry_run:
        cfg, _base, ft, hon, hon_info, task, task_info = prepare(
            args.base, args.finetuned, args.honesty_data, args.task_data, cfg)
        p = plan(ft, cfg, hon, task)
        print(json.dumps({"settings": cfg.to_dict(), "data": {"honesty": hon_info, "task": task_info},
                          "plan": p, "out": str(out)}, indent=2))
        print(f"dry run: would restore about {100 * p['expected_restored_fraction_of_linear']:.1f}% of "
              f"{p['linear_params']:,} block linear parameters in {p['units_kept']} of {p['units']} "
              f"{p['unit']}s; estimated peak memory {p['memory_estimate_mib']['total']:.0f} MiB; nothing written")
        return 0
    stats_options = {"cache_dir": args.cache_dir} if args.cache_dir else None
    result = repair(args.base, args.finetuned, args.honesty_data, args.task_data, cfg,
                    stats_options=stats_options)
    write_repair(result, out, plots=not args.no_plots, overwrite=args.overwrite)
    s = result.report["summary"]
    print(f"wrote {out}: restored {s['restored_params']:,} parameters "
          f"({100 * s['restored_fraction_of_linear']:.2f}% of block linear weights) in {s['layers_kept']} of "
          f"{s['layers']} layers; objective {s['objective_sft']:.4g} -> {s['objective_after']:.4g}; "
          f"time {sum(result.report['timing_s'].values()):.1f}s")
    return 0
