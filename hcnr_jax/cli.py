"""The `hcnr` command line. Each subcommand lives in `hcnr_jax/commands/<module>.py` (`MODULES`) and
defines `add_parser(subparsers)` (which sets `func`); this file only wires them together."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from hcnr_jax import interrupt
from hcnr_jax.errors import HcnrError

# Subcommands, in the order `hcnr --help` lists them.
COMMANDS = ("demo", "convert", "stats", "repair", "merge", "plan", "eval", "data", "calib", "train", "honesty-data",
            "compare", "cache")
# The module of each command: its name with "_" for "-", but `hcnr data` is benchmarks.py (`hcnr_jax.data`
# is the library's data package).
MODULES = {name: name.replace("-", "_") for name in COMMANDS} | {"data": "benchmarks"}


DESCRIPTION = ("Training-free honesty repair of fine-tuned LLMs (HCNR, arXiv 2511.12991) in JAX: repair, "
               "evaluate, train and convert models.")
EPILOG = ("Run `hcnr COMMAND --help` for a command's options; `hcnr demo` is the main job. Models are a Hugging "
          "Face directory, a .gguf file, a hub id org/name or BASE+ADAPTER_DIR. Bad input gets one line on "
          "stderr and exit status 2 (docs/errors.md).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hcnr", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, help="the command (each has its own --help)")
    for name in COMMANDS:
        importlib.import_module(f"hcnr_jax.commands.{MODULES[name]}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not args.verbose:
        # JAX logs backend probing ("Unable to initialize backend 'tpu'") and orbax (through absl)
        # a dozen lines per checkpoint at INFO: noise next to the progress bars.
        for name in ("jax", "absl", "orbax"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        # Ctrl-C stops the run at the next step boundary (a second one at once): see interrupt.py.
        with interrupt.deferred():
            rc = int(args.func(args) or 0)
            if interrupt.requested():  # Ctrl-C came during the last step, which completed
                print(f"hcnr {args.command}: finished; Ctrl-C came during its last step", file=sys.stderr)
            return rc
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        print(f"hcnr {args.command}: interrupted" + (f" ({e})" if str(e) else ""), file=sys.stderr)
        return 130
    except (HcnrError, OSError, UnicodeDecodeError) as e:
        # Bad input, files that cannot be read or written (disk full, read-only, not UTF-8): one line.
        if args.debug:
            raise
        print(f"hcnr {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
