"""The user's cache folder: files derived from inputs that are slow to rebuild (built tokenizers, ...).

Folder: ``$HCNR_CACHE_DIR``, else ``$XDG_CACHE_HOME/hcnr_jax``, else ``~/.cache/hcnr_jax`` (never
inside site-packages). An entry is a directory ``<folder>/<kind>/<key>/`` whose ``key`` is a hash
of everything its contents depend on; it is written whole (temporary directory + rename) with a
manifest of its files' sha256, and an entry that fails that check is reported and ignored, so the
caller rebuilds it. A cache folder that cannot be written is not an error: nothing is cached.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from hcnr_jax.io import atomic_output_dir, sha256_file

log = logging.getLogger(__name__)

ENV_VAR = "HCNR_CACHE_DIR"
MANIFEST = ".hcnr_cache.json"


def user_cache_dir() -> Path:
    """``$HCNR_CACHE_DIR``, else ``$XDG_CACHE_HOME/hcnr_jax``, else ``~/.cache/hcnr_jax`` (not created)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "hcnr_jax"
    return Path.home() / ".cache" / "hcnr_jax"


def entry_dir(kind: str, key: str) -> Path:
    """Where the entry ``key`` of ``kind`` (e.g. "tokenizers") lives, whether or not it exists."""
    return user_cache_dir() / kind / key


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def read_entry(kind: str, key: str) -> Path | None:
    """The entry's directory when it exists and every file matches its manifest; None otherwise
    (a damaged entry is reported with a warning, and the next ``write_entry`` replaces it)."""
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
