"""Side-effecting file helpers shared by every command: outputs appear whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from hcnr_jax.errors import HcnrError
from hcnr_jax.source import ModelSource

log = logging.getLogger(__name__)


# --- temporary names and leftovers of killed runs ---------------------------------------------------

def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _temp_prefix(name: str, kind: str) -> str:
    """``.NAME.<kind>-<host>-<pid>-`` (kind: ``tmp`` or ``old``): the owner of a temporary path is
    in its name, so a later run can tell the leftovers of a killed run from a live run's files."""
    return f".{name}.{kind}-{_host()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process (or an unanswerable question): assume alive
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def clean_stale_temps(out: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and directories that killed runs left beside ``out``
    (``.OUT.tmp-<host>-<pid>-*`` whose process on this host is gone; ``.OUT.old-...``, the set-aside
    previous output, only when ``out`` itself exists). Leftovers whose owner cannot be told (another
    host, names without a pid from older versions) are reported with a warning, never removed.
    Returns the removed paths."""
    out = Path(out)
    try:
        entries = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?P<kind>tmp|old)-(?:(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-)?")
    removed = []
    for p in entries:
        m = pattern.match(p.name)
        if m is None:
            continue
        owned_here = m["pid"] is not None and m["host"] == _host()
        if owned_here and _pid_alive(int(m["pid"])):
            continue  # a live run is writing it
        if owned_here and (m["kind"] == "tmp" or out.exists()):
            try:
                _remove(p)
            except FileNotFoundError:
                continue  # another run cleaned it up first
            except OSError as e:
                log.warning("%s: cannot remove the leftover of a killed run (%s)", p, e)
                continue
            log.warning("removed %s, left by a killed run (process %s)", p, m["pid"])
            removed.append(p)
        elif m["kind"] == "old" and not out.exists():
            log.warning("%s holds the previous %s, set aside by a run that was killed while replacing it; "
                        "move it back or remove it", p, out.name)
        else:
            log.warning("%s: leftover temporary %s of another run (%s); remove it by hand if no hcnr run is "
                        "writing %s", p, "directory" if p.is_dir() else "file",
                        f"host {m['host']}, process {m['pid']}" if m["pid"] else "owner unknown", out)
    return removed


def _umask() -> int:
    """The process umask (read by setting it and putting it back: there is no other way to read it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def user_mode(path_or_fd: str | os.PathLike | int, directory: bool) -> None:
    """Give a path made by `tempfile` (always 0600 files / 0700 folders, for its own safety) the
    mode any other file or folder the user creates gets: 0666 / 0777 less the umask."""
    mode = (0o777 if directory else 0o666) & ~_umask()
    if isinstance(path_or_fd, int):
        os.fchmod(path_or_fd, mode)
    else:
        os.chmod(path_or_fd, mode)


def user_modes_under(root: Path) -> None:
    """`user_mode` for ``root`` and everything under it (symlinks left alone): writers such as
    safetensors' create their files 0600 whatever the umask."""
    user_mode(root, directory=True)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            if not os.path.islink(p := os.path.join(dirpath, name)):
                user_mode(p, directory=True)
        for name in filenames:
            if not os.path.islink(p := os.path.join(dirpath, name)):
                user_mode(p, directory=False)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir``; on success it is renamed to ``out_dir``,
    its folders and files given the user's umask (0755/0644 under the usual 022).

    An existing ``out_dir`` is an error unless ``overwrite`` (then it is replaced only after the
    new one is complete). On any exception the temporary directory is removed and nothing else
    changes. A run killed outright (SIGKILL) cannot clean up: its leftovers are removed by the
    next write to the same output (`clean_stale_temps`).
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise HcnrError(f"{out}: output directory already exists (choose another path or remove it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out.name, "tmp"), dir=out.parent))
    try:
        yield tmp
        user_modes_under(tmp)  # the output gets the modes of the user's other files, not tempfile's 0700
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out.name, "old"), dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` under a temporary name, then rename: readers see the old file or
    the whole new one. The file gets the user's umask (0644 under 022)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name, "tmp"), dir=path.parent)
    try:
        user_mode(fd, directory=False)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _finite(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "dtype") and hasattr(obj, "tolist"):  # numpy scalars and arrays
        return _finite(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def finite_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` for reports: NaN and +-inf (undefined scores, e.g. precision without a single
    predicted refusal) become ``null``, so the file is valid JSON; anything else non-finite that
    slipped through is an error rather than a ``NaN`` token (``allow_nan=False``)."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def _nonfinite_fields(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _nonfinite_fields(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _nonfinite_fields(v, f"{path}[{i}]")
    elif hasattr(obj, "dtype") and hasattr(obj, "tolist"):
        yield from _nonfinite_fields(obj.tolist(), path)
    elif isinstance(obj, float) and not math.isfinite(obj):
        yield path, obj


def strict_json(obj: Any, dest: str | os.PathLike, **kwargs: Any) -> str:
    """``json.dumps`` for records in which every number must be finite (``hcnr_report.json``,
    ``stats.json``): a NaN or infinity is an `HcnrError` naming ``dest`` and the field (e.g.
    ``layers[3].objective_after``), raised before anything is written."""
    bad = list(_nonfinite_fields(obj))
    if bad:
        path, value = bad[0]
        more = f" (and {len(bad) - 1} more field(s))" if len(bad) > 1 else ""
        raise HcnrError(f"{dest}: field {path} is {value}{more}; refusing to write NaN or infinity "
                        "(a statistic or the solve overflowed)")
    return json.dumps(obj, allow_nan=False, default=float, **kwargs)


def check_finite_tensors(tensors: Mapping[str, Any], dest: str | os.PathLike, what: str = "tensor") -> None:
    """Refuse to write ``tensors`` (name -> array) to ``dest`` when one holds NaN or infinity: an
    `HcnrError` naming ``dest``, the tensor and the count, raised before anything is written."""
    import numpy as np

    for name, array in tensors.items():
        a = np.asarray(array)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            n = int(np.count_nonzero(~np.isfinite(a)))
            raise HcnrError(f"{dest}: {what} {name} holds {n} NaN or infinite value(s) of {a.size}; refusing to "
                            "write it (the model's weights are not finite, or its activations or gradients overflow "
                            "on this data)")


def set_aside(path: str | os.PathLike, reason: str) -> Path:
    """Rename a damaged file or directory to ``PATH.damaged-<time>`` (kept for inspection, out of
    the way of the rerun) and warn with both paths and ``reason``. Returns the new path."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    os.rename(path, target)
    log.warning("%s is damaged (%s); moved it to %s and computing it again", path, reason, target)
    return target


# --- locks -------------------------------------------------------------------------------------------

LOCK_TIMEOUT_S = 3600.0


def _lock_holder(fd: int) -> dict[str, Any] | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (which has not yet written its name)"
    me = holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()
    return (f"process {holder.get('pid')} on host {holder.get('host')}{' (this process)' if me else ''}, "
            f"since {holder.get('since')}")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _dead_here(holder: dict[str, Any] | None) -> bool:
    return bool(holder) and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
        and not _pid_alive(holder["pid"])


def _open_lock_file(path: Path) -> int | None:
    """The lock file's descriptor (the file created when missing); None in a folder where it cannot
    be created (read-only: warned)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        # A read-only folder (a shared cache of finished results): nothing can be written to it anyway.
        log.warning("%s: cannot create the lock file (%s); going on without a lock", path, e.strerror)
        return None


def _flock(fd: int, path: Path, what: str) -> str:
    """One non-blocking try to lock ``fd``, ``path``'s descriptor: "locked"; "busy" (another
    process holds it); "replaced" (its holder removed the file on release: ``fd`` closed, lock the
    new one); "unsupported" (no locks on this filesystem: ``fd`` closed, warned)."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _same_file(fd, path):
            return "locked"
        os.close(fd)
        return "replaced"
    except BlockingIOError:
        return "busy"
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        log.warning("%s: this filesystem does not support locks (%s); make sure no other run uses %s",
                    path, e, what)
        return "unsupported"
    except BaseException:
        os.close(fd)
        raise


def _remove_stale(path: Path, holder: dict[str, Any]) -> None:
    """Remove a stale lock file, still locked by a child that a process of this host, now gone,
    forked: the next try creates and locks a new one."""
    log.warning("%s: taking over the lock of process %s on this host, which is gone (a process it "
                "forked still holds the file)", path, holder["pid"])
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _acquire(path: Path, what: str, timeout: float, flag: str, poll: float) -> int | None:
    """Wait for the lock on ``path``: its locked descriptor, or None where no lock can be had
    (warned). Waits up to ``timeout`` seconds for a live holder, then raises `HcnrError`."""
    deadline = time.monotonic() + max(timeout, 0.0)
    told = False
    while True:
        fd = _open_lock_file(path)
        if fd is None:
            return None
        state = _flock(fd, path, what)
        if state == "locked":
            return fd
        if state == "unsupported":
            return None
        if state == "replaced":
            continue
        holder = _lock_holder(fd)
        stale = _dead_here(holder) and _same_file(fd, path)
        os.close(fd)
        if stale:
            _remove_stale(path, holder)  # type: ignore[arg-type]
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            raise HcnrError(f"{path}: {what} is locked by {_describe_holder(holder)}; gave up after waiting "
                            f"{timeout:g} s ({flag}). Wait for that run to end, or remove {path} if it is not "
                            "running")
        if not told:
            log.warning("%s is locked by %s; waiting up to %g s for it (%s)", what, _describe_holder(holder),
                        timeout, flag)
            told = True
        time.sleep(min(poll, left))


def _record_holder(fd: int, path: Path) -> None:
    """Write this process (host, pid, start time, command) into the lock file ``fd`` it holds."""
    previous = _lock_holder(fd)
    if previous:
        log.warning("%s: taking over the lock left by %s, which no longer holds it (a killed run)",
                    path, _describe_holder(previous))
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, timeout: float = LOCK_TIMEOUT_S, what: str | None = None,
              flag: str = "--lock-timeout", poll: float = 0.5) -> Iterator[Path]:
    """Hold an exclusive lock (``flock``) on the file ``path`` for the ``with`` block; the file
    records the holder (host, pid, start time, command) and is removed on release, exceptions and
    Ctrl-C included. The kernel releases the lock of a process that dies, so a killed run never
    blocks the next one: the file it leaves is taken over with a warning, as is a lock still held
    (by a forked child) whose recorded process on this host is gone.

    While another process holds it: a warning saying who, once, then waiting up to ``timeout``
    seconds (``flag`` is the option that sets it) and an `HcnrError` naming the holder. On a
    filesystem without locks, or where the lock file cannot be created (read-only), the block runs
    unlocked, with a warning."""
    path = Path(path)
    what = what or str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, what, timeout, flag, poll)
    if fd is None:  # no locks here
        yield path
        return
    try:
        _record_holder(fd, path)
        yield path
    finally:
        if _same_file(fd, path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.close(fd)


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


# --- outputs that would overwrite their inputs --------------------------------------------------------

def refuse_existing(out: str | os.PathLike, overwrite: bool, flag: str = "--out") -> None:
    """Every command's rule for its outputs, checked before any work: an existing ``out`` (file or
    folder) is replaced only with ``--overwrite``; without it, an `HcnrError` naming the path."""
    if not overwrite and os.path.lexists(out):
        raise HcnrError(f"{flag} {out}: already exists (pass --overwrite to replace it)")


def model_source_paths(src: str | os.PathLike) -> list[Path]:
    """The local files and directories a model source reads (`hcnr_jax.source.ModelSource`, parsed
    as `load_pretrained` parses it). Parts that do not exist locally (hub ids, typos) are left out."""
    return ModelSource.parse(src).local_paths()


def check_output_apart(out: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike | None]],
                       *, replaces: bool = False) -> None:
    """Refuse an output path that would overwrite an input, before any work: ``out`` equal to or
    inside a local path of the model sources ``inputs`` (``(what, source)`` pairs such as
    ``("--model", "base+adapter")``; a None source is skipped) and, when ``replaces`` (the command
    may replace ``out`` as a whole: ``--overwrite``), ``out`` containing one. Symlinks are
    resolved. The `HcnrError` names both paths."""
    target = Path(out).resolve()
    for what, src in inputs:
        if src is None:
            continue
        for part in model_source_paths(src):
            p = part.resolve()
            if target == p:
                raise HcnrError(f"{out}: the output is the {what} input {part} itself; choose another output path")
            if p in target.parents:
                raise HcnrError(f"{out}: the output would sit inside the {what} input {part}; "
                                "choose a path outside it")
            if replaces and target in p.parents:
                raise HcnrError(f"{out}: the output contains the {what} input {part}, which replacing it would "
                                "delete; choose another output path")
