"""`hcnr plan`: per-device memory, FLOPs and time of a repair from a config.json alone (no weights),
by compiling its steps ahead of time on simulated devices (``hcnr_jax.plan``)."""

from __future__ import annotations

import argparse
import json

from hcnr_jax.errors import HcnrError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from hcnr_jax.plan import DEFAULT_ACCELERATOR, DEFAULT_MFU, PEAKS

    p = sub.add_parser(
        "plan", help="memory, FLOPs and time of a repair from config.json, by compiling (no weights)",
        description="Compile the Fisher update, the Hessian update (all kept layers) and one layer's solve "
                    "for a model given by its HF config.json, on a mesh of simulated devices, and print "
                    "XLA's per-device memory and FLOPs and the expected time. Nothing runs, no weights are read.")
    p.add_argument("--config", required=True, help="HF config.json (or a model directory, a .gguf file or a hub id org/name[@revision])")
    p.add_argument("--mesh", default=None, help="mesh axes, e.g. data=2,model=4 [every device on data]")
    p.add_argument("--devices", type=int, default=None,
                   help="number of devices [the mesh's size, else 1]; simulated when this process has fewer")
    p.add_argument("--fsdp", action="store_true", help="also split weights over the data axis")
    p.add_argument("--batch-size", type=int, default=8, help="statistics batch size [8]")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sample [512]")
    p.add_argument("--max-targets", type=int, default=None,
                   help="LM head slots per row in the Fisher (targets per sample) [seq-len - 1]")
    p.add_argument("--num-honesty", type=int, default=128, help="honesty samples [128]")
    p.add_argument("--num-task", type=int, default=128, help="task samples [128]")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                   help="storage dtype of the weights [bfloat16]; statistics are float32")
    p.add_argument("--repair-config", default=None, help="YAML of repair settings (r_cw, solver, ...)")
    p.add_argument("--hessian-passes", type=int, default=None,
                   help="passes for the Hessians, each holding a share of the accumulators (as hcnr repair "
                        "--hessian-passes) [the repair config's; else the fewest that fit --device-memory, "
                        "else 1]")
    p.add_argument("--layers", choices=("full", "extrapolate"), default="full",
                   help="compile the whole model, or 1 and 2 blocks extrapolated to its depth (faster) [full]")
    p.add_argument("--accelerator", choices=sorted(PEAKS), default=DEFAULT_ACCELERATOR,
                   help=f"peak FLOP/s for the time estimate [{DEFAULT_ACCELERATOR}]")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"assumed utilisation of that peak [{DEFAULT_MFU}]")
    p.add_argument("--device-memory", default=None,
                   help="memory per device, e.g. 80GB or 141GiB: report which step does not fit, by how much, "
                        "and choose the Hessian passes [this machine's accelerator's memory, if it has one]")
    p.add_argument("--no-offload", action="store_true",
                   help="plan hcnr repair --no-offload: the idle model stays on the devices beside every step "
                        "[it waits in host memory]")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--out", default=None, help="also write the JSON plan to this file (must not exist unless "
                   "--overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hcnr_jax import plan
    from hcnr_jax.io import atomic_write_text, refuse_existing
    from hcnr_jax.repair.config import load_config
    from hcnr_jax.settings import user_set

    # Settings first, then the output path, then the model's config (the order of every command).
    for name in ("batch_size", "seq_len", "num_honesty", "num_task"):
        if getattr(args, name) < 1 or (name == "seq_len" and args.seq_len < 2):
            raise HcnrError(f"--{name.replace('_', '-')} {getattr(args, name)}: too small")
    if not 0 < args.mfu <= 1:
        raise HcnrError(f"--mfu {args.mfu}: must be in (0, 1]")
    device_bytes = plan.parse_bytes(args.device_memory)
    if device_bytes is None:
        device_bytes = plan.local_device_bytes()
    rcfg = load_config(args.repair_config, hessian_passes=args.hessian_passes)
    devices = plan.devices_for(args.mesh, args.devices)
    if args.out:
        refuse_existing(args.out, args.overwrite)
    hf = plan.load_checked_hf_config(args.config)
    req = plan.PlanRequest(
        hf_config=hf, devices=devices, mesh_spec=args.mesh, fsdp=args.fsdp, batch_size=args.batch_size,
        seq_len=args.seq_len, max_targets=args.max_targets, dtype=args.dtype, repair=rcfg.to_dict(),
        num_honesty=args.num_honesty, num_task=args.num_task, layers=args.layers, device_bytes=device_bytes,
        offload_idle=not args.no_offload,
        # Passes set nowhere (flag or repair config): chosen to fit the device memory.
        auto_hessian_passes=device_bytes is not None and not user_set("hessian_passes", args.hessian_passes,
                                                                      args.repair_config))
    result = plan.plan_on_devices(req)
    doc = plan.plan_document(result, args.accelerator, args.mfu, device_bytes)
    if args.out:
        atomic_write_text(args.out, json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(plan.format_plan(result, args.accelerator, args.mfu, device_bytes))
    return 0
