"""The user cache: hcnr's own folder of files that are slow to rebuild and safe to delete.

(Not the KV cache of generation, nor the result cache a user names with ``--cache-dir``: those are
other things. Here "the user cache" always means this folder.)

Folder: ``$HCNR_CACHE``, else ``$HCNR_CACHE_DIR`` (its older name), else ``$XDG_CACHE_HOME/hcnr``,
else ``~/.cache/hcnr`` (never inside site-packages). It holds three sections:

- ``runs/<command>-<key>/``: the resumable work of one run of ``hcnr stats``, ``hcnr repair`` or
  ``hcnr eval`` (statistics checkpoints and results, evaluation records). ``key`` hashes the
  command's inputs (model sources with their files' sizes and times, data hashes, settings), so the
  same command finds its folder again after Ctrl-C or a crash and resumes. The folder is removed
  once the run has written its output, unless the user asks to keep it (``--keep-cache``).
- ``tokenizers/<key>/``: tokenizers built from GGUF metadata. An entry is written whole
  (temporary directory + rename) with a manifest of its files' sha256; an entry that fails that
  check is reported and ignored, so the caller rebuilds it.
- ``data/``: downloaded benchmark files (`hcnr_jax.eval.data`); never evicted.

Runs and tokenizers are evicted least recently used first when they pass the size cap,
``$HCNR_CACHE_MAX_SIZE`` (e.g. ``20GB``, ``500MB``, ``none``; default 50 GB). A run folder in use
(a shared ``flock`` on its marker file) is never evicted or cleared. A cache folder that cannot be
written is not an error: the run goes on without it (and cannot resume).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hcnr_jax.errors import HcnrError
from hcnr_jax.io import atomic_output_dir, sha256_file

log = logging.getLogger(__name__)

ENV_VAR = "HCNR_CACHE"
OLD_ENV_VAR = "HCNR_CACHE_DIR"  # the variable's name before the cache held runs; still honoured
SIZE_ENV_VAR = "HCNR_CACHE_MAX_SIZE"
DEFAULT_MAX_BYTES = 50 * 10**9
MANIFEST = ".hcnr_cache.json"
RUN_MARKER = ".hcnr_run.json"
RUNS, TOKENIZERS, DATA = "runs", "tokenizers", "data"
EVICTABLE = (RUNS, TOKENIZERS)


def user_cache_dir() -> Path:
    """``$HCNR_CACHE``, else ``$HCNR_CACHE_DIR``, else ``$XDG_CACHE_HOME/hcnr``, else
    ``~/.cache/hcnr`` (not created)."""
    for var in (ENV_VAR, OLD_ENV_VAR):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "hcnr"
    return Path.home() / ".cache" / "hcnr"


def legacy_cache_dir() -> Path | None:
    """The folder versions before 0.2 used (``.../hcnr_jax``) when it exists and differs from the
    current one: its downloaded benchmarks are still read (`hcnr_jax.eval.data.user_data_dir`)."""
    if os.environ.get(ENV_VAR) or os.environ.get(OLD_ENV_VAR):
        return None
    root = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    old = root / "hcnr_jax"
    return old if old.is_dir() else None


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str, what: str = SIZE_ENV_VAR) -> int | None:
    """Bytes of ``"20GB"``, ``"500MiB"``, ``"1e9"``-free plain integers...; None for ``none`` /
    ``unlimited`` (no cap). A value that is neither is an `HcnrError` naming ``what``."""
    if text.strip().lower() in ("none", "unlimited", "off"):
        return None
    m = _SIZE.match(text)
    if not m:
        raise HcnrError(f"{what}={text!r}: expected a size such as 20GB, 500MB or none")
    unit = (m.group(2) or "").lower().removesuffix("b")
    return int(float(m.group(1)) * _UNITS[unit])


def max_bytes() -> int | None:
    """The size cap of the evictable sections (runs, tokenizers); None: no cap."""
    text = os.environ.get(SIZE_ENV_VAR)
    return DEFAULT_MAX_BYTES if not text else parse_size(text)


def human(n: float) -> str:
    """``1.23 GB`` (decimal units, as disks are sold and `du -h --si` prints)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def tree_size(path: Path) -> int:
    """Bytes of the files under ``path`` (a file: its size); files vanishing meanwhile count 0."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


# --- tokenizer entries (content-addressed, checked by manifest) ------------------------------------

def entry_dir(kind: str, key: str) -> Path:
    """Where the entry ``key`` of ``kind`` (e.g. "tokenizers") lives, whether or not it exists."""
    return user_cache_dir() / kind / key


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def read_entry(kind: str, key: str) -> Path | None:
    """The entry's directory when it exists and every file matches its manifest; None otherwise
    (a damaged entry is reported with a warning, and the next ``write_entry`` replaces it). A hit
    marks the entry as used now (least recently used entries are evicted first)."""
    root = entry_dir(kind, key)
    if not root.exists():
        return None
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        if manifest.get("key") != key or manifest.get("files") != _files(root):
            raise ValueError("files do not match the manifest")
    except (OSError, ValueError, AttributeError) as e:
        log.warning("ignoring damaged cache entry %s (%s); it will be rebuilt", root, e)
        return None
    with contextlib.suppress(OSError):
        os.utime(root / MANIFEST)
    return root


def write_entry(kind: str, key: str, write: Callable[[Path], object]) -> Path | None:
    """Write an entry: ``write(tmp_dir)`` fills a temporary directory, which gets a manifest and is
    renamed into place (replacing a damaged one). None, and nothing cached, when the cache folder
    cannot be written."""
    root = entry_dir(kind, key)
    try:
        with atomic_output_dir(root, overwrite=True) as tmp:
            write(tmp)
            (tmp / MANIFEST).write_text(json.dumps({"key": key, "files": _files(tmp)}, indent=1) + "\n")
    except OSError as e:
        log.info("not caching %s/%s: %s is not writable (%s)", kind, key, user_cache_dir(), e)
        return None
    return root


# --- run folders (resumable work of one command) ---------------------------------------------------

def source_identity(src: Any) -> dict[str, Any]:
    """What a model source is, cheaply: its text, and the size and modification time of every
    local file it reads (a model rewritten in place gets another identity; no weights are read)."""
    from hcnr_jax.source import ModelSource

    if src is None:
        return {}
    source = ModelSource.parse(src)
    files = []
    for part in source.local_paths():
        part = part.resolve()
        paths = [part] if part.is_file() else sorted(p for p in part.rglob("*") if p.is_file())
        for p in paths:
            st = p.stat()
            files.append([str(p), st.st_size, st.st_mtime_ns])
    return {"source": str(source), "files": files}


def file_identity(path: Any) -> str | None:
    """sha256 of a data file (None for None: a bundled default the settings name)."""
    return None if path is None else sha256_file(path)


def run_key(identity: dict[str, Any]) -> str:
    """24 hex digits of the sha256 of ``identity`` (JSON, sorted keys)."""
    blob = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _lock(marker: Path, exclusive: bool) -> int | None:
    """An fd holding a flock on ``marker`` (shared: in use by a run; exclusive: being removed),
    or None when another process holds a conflicting one."""
    fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_if_unused(folder: Path) -> bool:
    """Remove ``folder`` unless a run holds its marker; True when removed."""
    marker = folder / RUN_MARKER
    try:
        fd = _lock(marker, exclusive=True) if marker.exists() else None
    except OSError:
        fd = None
    if marker.exists() and fd is None:
        return False
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        if fd is not None:
            os.close(fd)
    return not folder.exists()


@dataclass
class Run:
    """A run folder in use: ``path`` holds the run's resumable work; ``keep`` says whether it stays
    after success (``--keep-cache``); ``resumed``: it held work of an earlier, unfinished run."""

    path: Path
    keep: bool
    resumed: bool


@contextlib.contextmanager
def run_folder(command: str, identity: dict[str, Any], *, keep: bool = False,
               description: str = "") -> Iterator[Run | None]:
    """The run folder of ``command`` for these inputs (created or found again), held in use for the
    block. After the block succeeds the folder is removed unless ``keep``; after an error or
    Ctrl-C it stays, so the same command resumes. Yields None when the cache cannot be written."""
    folder = user_cache_dir() / RUNS / f"{command}-{run_key({'command': command, **identity})}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / RUN_MARKER
        resumed = marker.exists() and any(p.name != RUN_MARKER for p in folder.iterdir())
        fd = _lock(marker, exclusive=False)
        if fd is None:  # being removed by `hcnr cache clear` this instant: retry once it is gone
            raise OSError(f"{folder} is being removed")
        marker.write_text(json.dumps({"command": command, "description": description,
                                      "last_used": time.time()}, indent=1) + "\n")
    except OSError as e:
        log.warning("user cache %s not writable (%s): this run cannot be resumed if stopped", user_cache_dir(), e)
        yield None
        return
    prune(protect={folder})
    ok = False
    try:
        yield Run(folder, keep, resumed)
        ok = True
    finally:
        with contextlib.suppress(OSError):
            os.utime(marker)  # last used: now (least recently used folders are evicted first)
        os.close(fd)
        # After success, or after a failure that left nothing to resume from.
        if (ok and not keep) or (not ok and [p.name for p in folder.iterdir()] == [RUN_MARKER]):
            _remove_if_unused(folder)
        elif ok:
            prune(protect={folder})


# --- what is in the cache, eviction, clearing ----------------------------------------------------

@dataclass
class Entry:
    """One evictable thing in the cache: a run folder or a tokenizer."""

    path: Path
    section: str
    bytes: int
    last_used: float
    description: str
    in_use: bool


def _in_use(folder: Path) -> bool:
    marker = folder / RUN_MARKER
    if not marker.exists():
        return False
    try:
        fd = _lock(marker, exclusive=True)
    except OSError:
        return False
    if fd is None:
        return True
    os.close(fd)
    return False


def entries(root: Path | None = None) -> list[Entry]:
    """The run folders and tokenizers in the cache, least recently used first."""
    root = root or user_cache_dir()
    out = []
    for section in EVICTABLE:
        base = root / section
        if not base.is_dir():
            continue
        for p in base.iterdir():
            if not p.is_dir() or p.name.startswith("."):
                continue
            marker = p / (RUN_MARKER if section == RUNS else MANIFEST)
            try:
                last = marker.stat().st_mtime
            except OSError:
                last = p.stat().st_mtime
            desc = ""
            if section == RUNS:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    desc = json.loads(marker.read_text()).get("description", "")
            out.append(Entry(p, section, tree_size(p), last, desc, section == RUNS and _in_use(p)))
    return sorted(out, key=lambda e: e.last_used)


def prune(limit: int | None = -1, protect: set[Path] | frozenset = frozenset()) -> list[Entry]:
    """Evict least recently used run folders and tokenizers until the evictable sections fit in
    ``limit`` bytes (default: `max_bytes`); never a folder in use or in ``protect``. Returns the
    evicted entries (each one logged)."""
    limit = max_bytes() if limit == -1 else limit
    if limit is None:
        return []
    try:
        found = entries()
    except OSError:
        return []
    total = sum(e.bytes for e in found)
    evicted = []
    for e in found:
        if total <= limit:
            break
        if e.in_use or e.path in protect:
            continue
        if e.section == RUNS:
            removed = _remove_if_unused(e.path)
        else:
            shutil.rmtree(e.path, ignore_errors=True)
            removed = not e.path.exists()
        if removed:
            total -= e.bytes
            evicted.append(e)
            log.info("user cache over its cap (%s): evicted %s (%s, unused since %s)", human(limit), e.path,
                     human(e.bytes), time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)))
    return evicted


def clear(sections: tuple[str, ...] = EVICTABLE) -> tuple[int, list[Path]]:
    """Remove ``sections`` of the cache (runs in use are left alone). Returns (bytes freed, the
    folders left because a run is using them)."""
    root = user_cache_dir()
    freed, busy = 0, []
    for section in sections:
        base = root / section
        if not base.is_dir():
            continue
        for p in sorted(base.iterdir()):
            size = tree_size(p)
            if section == RUNS and p.is_dir():
                if not _remove_if_unused(p):
                    busy.append(p)
                    continue
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            freed += size
    return freed, busy


def summary_line() -> str:
    """One line on what the user cache holds (printed after runs that leave something there)."""
    root = user_cache_dir()
    used = sum(e.bytes for e in entries(root)) if root.exists() else 0
    cap = max_bytes()
    return (f"user cache {root}: {human(used)} of resumable runs and tokenizers (cap "
            f"{'none' if cap is None else human(cap)}, ${SIZE_ENV_VAR}); `hcnr cache info`, `hcnr cache clear`")
