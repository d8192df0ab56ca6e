"""`hcnr train`: SFT, DPO or ORPO on a model, full or LoRA; writes a PEFT adapter or a HF directory."""

from __future__ import annotations

import argparse
import json
import typing
from pathlib import Path

from hcnr_jax.errors import HcnrError
from hcnr_jax.train.config import METHODS, OBJECTIVES, SCHEDULES, TrainConfig

# TrainConfig fields settable by flag (--learning-rate for learning_rate, ...): help and choices;
# types and shown defaults are read from TrainConfig, so they cannot drift apart.
SETTINGS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "objective": ("training objective", OBJECTIVES),
    "method": ("LoRA adapter or every parameter", METHODS),
    "lora_rank": ("LoRA rank r", None),
    "lora_alpha": ("LoRA alpha (scaling alpha / r)", None),
    "lora_targets": ("comma-separated linear layers to adapt", None),
    "learning_rate": ("peak learning rate (AdamW)", None),
    "weight_decay": ("AdamW weight decay", None),
    "warmup_ratio": ("fraction of steps of linear warm-up", None),
    "schedule": ("learning-rate decay after warm-up", SCHEDULES),
    "max_grad_norm": ("global gradient-norm clipping (0: off)", None),
    "epochs": ("passes over the data (may be fractional)", None),
    "max_steps": ("optimizer steps (overrides --epochs)", None),
    "batch_size": ("samples per micro-batch", None),
    "grad_accum": ("micro-batches per optimizer step", None),
    "beta": ("DPO beta", None),
    "orpo_lambda": ("ORPO lambda", None),
    "max_length": ("tokens per sample", None),
    "limit": ("use the first N samples", None),
    "checkpoint_every": ("steps between checkpoints (with --checkpoint-dir)", None),
    "seed": ("LoRA initialisation and data order", None),
}


def _flag_type(name: str) -> type:
    hint = typing.get_type_hints(TrainConfig)[name]
    if typing.get_origin(hint) is tuple:
        return str  # comma-separated
    return next((a for a in typing.get_args(hint) if a is not type(None)), hint)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a model (SFT, DPO, ORPO; LoRA or full) in JAX",
        description="Train MODEL on DATA. Settings: defaults <- --config YAML <- flags. LoRA runs write a PEFT "
                    "adapter directory (load it as MODEL+OUT); full runs write a HF directory.")
    p.add_argument("--model", required=True, help="starting model: HF dir, .gguf, hub id, or BASE+ADAPTER[+ADAPTER]")
    p.add_argument("--data", required=True,
                   help="JSONL: {prompt, response} for sft, {prompt, chosen, rejected} for dpo/orpo")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--config", default=None, help="YAML file of training settings, or the name of a shipped one (train_honest, train_task)")
    defaults = TrainConfig()
    for name, (text, choices) in SETTINGS.items():
        default = getattr(defaults, name)
        shown = ",".join(default) if isinstance(default, tuple) else default
        p.add_argument("--" + name.replace("_", "-"), type=_flag_type(name), choices=choices, default=None,
                       help=f"{text} [{'all' if default is None else shown}]")
    p.add_argument("--choose", default=None, metavar="SETTING=V,V,...",
                   help="train once per value (e.g. beta=0.05,0.1,0.5) and keep the one the development rule "
                        "chooses (docs/method.md, \"Choosing a setting\"); needs --base, --dev-honesty, --dev-task")
    p.add_argument("--base", default=None,
                   help="with --choose: the model before the task fine-tune (the rule's honest reference)")
    p.add_argument("--dev-honesty", default=None, metavar="FILE",
                   help="with --choose: development honesty samples (`hcnr calib --split development`)")
    p.add_argument("--dev-task", default=None, metavar="FILE", help="with --choose: development task samples")
    p.add_argument("--checkpoint-dir", default=None, help="save checkpoints here and resume from them")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=8 (default: all devices on data)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def _choice_args(args: argparse.Namespace) -> tuple[str, list[float]] | None:
    """``(setting, values)`` of --choose, checked before anything is loaded; None without it."""
    from hcnr_jax.repair.choose import parse_candidates
    from hcnr_jax.train.choose import CHOOSABLE

    extra = [f for f in ("base", "dev_honesty", "dev_task") if getattr(args, f)]
    if args.choose is None:
        if extra:
            raise HcnrError(f"--{extra[0].replace('_', '-')} is used only with --choose")
        return None
    name, sep, values = args.choose.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or name not in CHOOSABLE:
        raise HcnrError(f"--choose {args.choose!r}: expected SETTING=V,V,... with SETTING one of {', '.join(CHOOSABLE)}")
    if getattr(args, name, None) is not None:
        raise HcnrError(f"--choose {name}=... and --{name.replace('_', '-')} both given: choose one")
    missing = [f for f in ("base", "dev_honesty", "dev_task") if not getattr(args, f)]
    if missing:
        raise HcnrError(f"--choose needs --{missing[0].replace('_', '-')} (the rule compares with the model before the "
                        "task fine-tune, on development data, never evaluation data)")
    for f in (args.dev_honesty, args.dev_task):
        if not Path(f).is_file():
            raise HcnrError(f"{f}: no such data file")
    return name, parse_candidates(values, f"--choose {name}")


def run(args: argparse.Namespace) -> int:
    from hcnr_jax.train.config import load_train_config

    tc = load_train_config(args.config, **{k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None})
    choice = _choice_args(args)
    if choice is not None:  # every candidate's settings are checked before the first is trained
        from hcnr_jax.train.choose import candidate_configs

        candidate_configs(tc, *choice)
    if args.mesh is not None:
        from hcnr_jax.sharding import parse_mesh

        parse_mesh(args.mesh)
    out = Path(args.out)
    # Everything cheap is checked before the model is loaded: settings (above), then the output path.
    if out.exists() and not args.overwrite:
        raise HcnrError(f"{out}: output directory already exists (choose another path or pass --overwrite)")
    from hcnr_jax.io import check_output_apart

    # --overwrite replaces --out as a whole: then it must not contain an input either.
    check_output_apart(out, [("--model", args.model), ("--data", args.data)], replaces=args.overwrite)
    if not Path(args.data).is_file():
        raise HcnrError(f"{args.data}: no such data file")
    from hcnr_jax.preflight import check_data_files, check_models

    # The data files whole, then the models' configs (with --choose, --base against --model), then the
    # pre-tokenized ids against the vocabulary: all before any weight is read.
    pairs = tc.objective != "sft"
    check_data_files([args.data], pairs=pairs)
    check_data_files([args.dev_honesty, args.dev_task])
    configs = check_models([("--base", args.base), ("--model", args.model)], same=args.base is not None)
    vocab = configs["--model"].vocab_size
    check_data_files([args.data] if not pairs else [], vocab_size=vocab)
    check_data_files([args.dev_honesty, args.dev_task], vocab_size=vocab)
    from hcnr_jax.pretrained import resolve_max_length
    from hcnr_jax.settings import user_set

    max_length = resolve_max_length([args.model], tc.max_length, user_set("max_length", args.max_length, args.config))
    if max_length != tc.max_length:
        tc = tc.override(max_length=max_length)

    from hcnr_jax import load_pretrained
    from hcnr_jax.train import loop
    from hcnr_jax.train.output import write_result

    model = load_pretrained(args.model)
    data = loop.load_training_data(args.data, model, tc)
    if choice is None:
        result = loop.train(model, data, tc, checkpoint_dir=args.checkpoint_dir, mesh=args.mesh)
    else:
        from hcnr_jax.repair.choose import describe, dev_score, load_dev_data
        from hcnr_jax.train.choose import train_and_choose

        dev = load_dev_data(args.dev_honesty, args.dev_task, model, tc.max_length)
        base = load_pretrained(args.base)
        from hcnr_jax.repair import check_compatible

        check_compatible(base, model)
        base_score = dev_score(base.params, model, dev)
        del base
        result = train_and_choose(model, data, tc, *choice, dev, base_score, checkpoint_dir=args.checkpoint_dir,
                                  mesh=args.mesh)
        print("\n".join(describe(result.report["choice"], choice[0])))
        tc = tc.override(**{choice[0]: result.report["settings"][choice[0]]})
    from hcnr_jax.io import portable_path
    from hcnr_jax.source import ModelSource

    result.report.update(model=ModelSource.parse(args.model).describe(portable_path), data=portable_path(args.data))
    write_result(result, model, out, tc, overwrite=args.overwrite)
    r = result.report
    print(f"wrote {out}: {tc.method} {tc.objective}, {r['steps']} steps on {r['samples']} samples, final loss "
          f"{r['final_loss']:.4f}, {r['wall_s']:.0f}s ({r['samples_per_s']:.2f} samples/s)")
    print(json.dumps({k: r[k] for k in ("steps", "samples", "wall_s", "trainable_params")}))
    return 0

