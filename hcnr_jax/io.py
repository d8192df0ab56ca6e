"""Side-effecting file helpers shared by every command: outputs appear whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hcnr_jax.errors import HcnrError


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir``; on success it is renamed to ``out_dir``.

    An existing ``out_dir`` is an error unless ``overwrite`` (then it is replaced only after the
    new one is complete). On any exception the temporary directory is removed and nothing else
    changes.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise HcnrError(f"{out}: output directory already exists (choose another path or remove it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def portable_path(path: str | os.PathLike) -> str:
    """``path`` as recorded in reports: under this Python's site-packages (the embedded GGUF) it is
    written ``<site-packages>/...``, under the working directory relative to it, so that results
    committed or shared do not carry one machine's paths. Other paths are kept as given."""
    import sysconfig

    resolved = Path(path).absolute()
    for root, tag in ((Path(sysconfig.get_paths()["purelib"]), "<site-packages>"), (Path.cwd(), None)):
        if resolved.is_relative_to(root):
            rel = resolved.relative_to(root).as_posix()
            return f"{tag}/{rel}" if tag else rel
    return str(path)
