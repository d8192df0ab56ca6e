"""`hcnr cache info|clear`: what the user cache holds (resumable runs, tokenizers, downloaded
benchmarks), and emptying it. The folder and its rules: `hcnr_jax.user_cache`."""

from __future__ import annotations

import argparse
import time

DESCRIPTION = """\
The user cache is hcnr's own folder: $HCNR_CACHE, else $XDG_CACHE_HOME/hcnr, else ~/.cache/hcnr.
runs/        the resumable work of `hcnr stats`, `hcnr repair` and `hcnr eval` (statistics
             checkpoints, evaluation records): a command stopped by Ctrl-C or a crash resumes from
             here when rerun; removed once the command succeeds, unless --keep-cache
tokenizers/  tokenizers built from GGUF files
data/        downloaded benchmarks (`hcnr data`); never evicted, cleared only with --data
Runs and tokenizers are evicted least recently used first beyond $HCNR_CACHE_MAX_SIZE
(default 50GB; 'none': no cap). Commands take --no-cache (no resumable state at all) and
--cache-dir DIR (statistics kept in DIR, which you manage)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="show or empty the user cache (resumable runs, tokenizers, downloaded data)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", required=True, help="info or clear")
    info = actions.add_parser("info", help="where the user cache is, its size and each resumable run",
                              description="Print where the user cache is, its size and each resumable run. "
                                          "Changes nothing.")
    info.set_defaults(func=run_info)
    clear = actions.add_parser("clear", help="remove resumable runs and tokenizers (runs in progress are kept)",
                               description="Remove the user cache's resumable runs and tokenizers (runs in "
                                           "progress are kept); --data also removes downloaded benchmarks.")
    clear.add_argument("--data", action="store_true", help="also remove downloaded benchmarks (data/)")
    clear.set_defaults(func=run_clear)


def run_info(args: argparse.Namespace) -> int:
    from hcnr_jax import user_cache

    root = user_cache.user_cache_dir()
    cap = user_cache.max_bytes()
    found = user_cache.entries(root) if root.exists() else []
    data = user_cache.tree_size(root / user_cache.DATA) if (root / user_cache.DATA).exists() else 0
    used = sum(e.bytes for e in found)
    print(f"user cache: {root}{'' if root.exists() else ' (not created yet)'}")
    print(f"  runs and tokenizers: {user_cache.human(used)} (cap {'none' if cap is None else user_cache.human(cap)}, "
          f"${user_cache.SIZE_ENV_VAR}; least recently used evicted first)")
    for section in user_cache.EVICTABLE:
        these = [e for e in found if e.section == section]
        print(f"  {section}/: {len(these)}, {user_cache.human(sum(e.bytes for e in these))}")
        if section == user_cache.RUNS:
            for e in reversed(these):
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
                state = "in use" if e.in_use else f"last used {when}"
                print(f"    {e.path.name}  {user_cache.human(e.bytes)}  {state}  {e.description}")
    print(f"  data/: {user_cache.human(data)} (downloaded benchmarks; not evicted)")
    old = user_cache.legacy_cache_dir()
    if old is not None:
        print(f"  an older cache folder exists: {old} ({user_cache.human(user_cache.tree_size(old))}); only its data/ is "
              "still read, while the new data/ does not exist; remove it when you no longer need it")
    return 0


def run_clear(args: argparse.Namespace) -> int:
    from hcnr_jax import user_cache

    sections = user_cache.EVICTABLE + ((user_cache.DATA,) if args.data else ())
    freed, busy = user_cache.clear(sections)
    print(f"removed {user_cache.human(freed)} from {user_cache.user_cache_dir()} ({', '.join(s + '/' for s in sections)})")
    for p in busy:
        print(f"kept {p}: a run is using it")
    return 0


# --- the flags every resumable command takes ----------------------------------------------------

def add_flags(p: argparse.ArgumentParser, what: str) -> None:
    """--no-cache / --keep-cache (the user cache's run folder; ``what``: what it holds)."""
    p.add_argument("--no-cache", action="store_true",
                   help=f"keep no resumable state: a stopped run starts over (default: {what} go to the user "
                        "cache, `hcnr cache info`, so rerunning the same command resumes)")
    p.add_argument("--keep-cache", action="store_true",
                   help=f"keep the {what} in the user cache after success (default: removed once the output "
                        "is written; they can be large: an 8B model's Hessians are tens of GB)")


def check_flags(args: argparse.Namespace) -> None:
    """Contradictory cache flags, named, before any work."""
    from hcnr_jax import user_cache
    from hcnr_jax.errors import HcnrError

    if args.no_cache and args.keep_cache:
        raise HcnrError("--no-cache and --keep-cache contradict each other: choose one")
    if args.no_cache and getattr(args, "cache_dir", None):
        raise HcnrError("--no-cache and --cache-dir contradict each other: choose one")
    user_cache.max_bytes()  # a bad $HCNR_CACHE_MAX_SIZE fails now, not after the work


def run_folder(args: argparse.Namespace, command: str, identity: dict, description: str):
    """The context of a resumable command: the user cache's run folder (a `hcnr_jax.user_cache.Run`),
    or None with --no-cache or --cache-dir (the user's own folder, left as it is)."""
    import contextlib

    from hcnr_jax import user_cache

    if args.no_cache or getattr(args, "cache_dir", None):
        return contextlib.nullcontext(None)
    return user_cache.run_folder(command, identity, keep=args.keep_cache, description=description)


def say_kept(run) -> None:
    """After success: say where kept state is (with --keep-cache), or nothing."""
    from hcnr_jax import user_cache

    if run is not None and run.keep:
        print(f"kept this run's resumable state in {run.path} (--keep-cache); {user_cache.summary_line()}")
