"""`hcnr data [--data-dir DIR]`: which benchmarks can be read, from where, and where to get the rest.
(The module is not called `data`: that is the library package `hcnr_jax.data`.)"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="list the benchmarks: available or not (and from where), source, licence, rows",
                       description="List every benchmark: whether its files are available and from which folder, its "
                                   "source, licence and row count (docs/data.md). Writes nothing.")
    p.add_argument("--data-dir", default=None,
                   help="benchmark data folder searched first (then $HCNR_DATA_DIR, the user data folder, "
                        "the shipped subsets)")
    p.add_argument("--no-count", action="store_true", help="do not read the files to count their rows")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hcnr_jax.data.benchmarks import BENCHMARKS, HUB, load_benchmark, locate, search_path
    from hcnr_jax.errors import DataError

    print("Searched, in order: " + "; ".join(f"{root} ({label})" for label, root in search_path(args.data_dir))
          + "; then the shipped subsets.")
    print("| benchmark | kind | available from | rows | rows of the full files | files | source | licence "
          "| Hugging Face Hub |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, b in BENCHMARKS.items():
        hub = b.hub.repo if b.hub else ""
        try:
            loc = locate(name, args.data_dir)
        except DataError:
            where, rows = "no", ""
        else:
            where = loc.describe()
            # Rows as read (duplicate questions kept once); never a download just to count.
            rows = "" if args.no_count or loc.source == HUB else str(len(load_benchmark(name, args.data_dir)))
        print(f"| {name} | {b.kind} | {where} | {rows} | {b.rows} | {', '.join(b.files)} | {b.url} | {b.licence} "
              f"| {hub} |")
    print("\nTo add a benchmark: download its files from its source and place them at the paths listed, under "
          "one of the folders searched (docs/data.md). `--data-dir hub` loads the benchmarks that have a "
          "Hugging Face Hub dataset from the Hub instead.")
    return 0
