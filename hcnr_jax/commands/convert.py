"""`hcnr convert SRC OUT`: any supported source to a Hugging Face directory."""

from __future__ import annotations

import argparse
import math
import time

from hcnr_jax.conversion.hf import DTYPES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a HF dir, .gguf file, hub id or BASE+ADAPTER_DIR to a HF dir",
                       description="Read SRC (any supported source) and write it as a Hugging Face directory OUT: "
                                   "tensors bit-identical unless --dtype casts them, GGUF dequantised, LoRA adapters "
                                   "merged.")
    p.add_argument("src", help="HF model directory, .gguf file, hub id org/name[@revision] (the local hub cache "
                   "first; HF_HUB_OFFLINE=1: only it), or BASE+ADAPTER_DIR[+ADAPTER_DIR...] (PEFT LoRA); "
                   "an existing local path wins over a hub id")
    p.add_argument("out", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="cast parameters (default: keep)")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors shard (default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hcnr_jax.errors import HcnrError
    from hcnr_jax.io import check_output_apart, refuse_existing
    from hcnr_jax.pretrained import load_pretrained, save_pretrained

    # Settings, then the output path, then the model: bad input fails before any weight is read.
    if not (math.isfinite(args.max_shard_size) and args.max_shard_size > 0):
        raise HcnrError(f"--max-shard-size {args.max_shard_size}: must be a positive number of GiB")
    refuse_existing(args.out, args.overwrite, flag="OUT")
    check_output_apart(args.out, [("SRC", args.src)], replaces=args.overwrite)
    t0 = time.perf_counter()
    model = load_pretrained(args.src, dtype=args.dtype)
    out = save_pretrained(model, args.out, max_shard_bytes=max(1, int(args.max_shard_size * 2**30)),
                          overwrite=args.overwrite)
    n = sum(x.size for x in __import__("jax").tree_util.tree_leaves(model.params))
    print(f"wrote {out} ({model.config.model_type}, {n / 1e6:.1f}M parameters, {model.dtype}) "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0
