"""A parameter tree moved out of the memory the computation runs in, and back.

A repair holds two models, but each of its statistics passes runs on one of them (the honesty
Fisher on the base, the task Fisher on the fine-tuned model, the Hessians on ``calib_model``).
While one pass runs, the other model waits here:

- on an accelerator, in host memory (``jax.device_get``), leaving the device a whole model freer;
- on a CPU, where host memory is the device's, in raw files of a folder (the repair's run
  folder, or a temporary one): the kernel's page cache holds them, and drops them under pressure.

`restore` puts every leaf back with its sharding, bit for bit, and deletes the files. Only trees
whose arrays this process can address whole are offloaded (one process; any mesh within it).

A process killed outright (SIGKILL, out of memory) cannot delete its files. Each offload folder
names its owner (``OWNER``: host, process id and the process's start time), and every new offload
into the same parent first deletes the folders whose owner on this host no longer runs.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from hcnr_jax.params import Params, hf_name


def release_free_heap() -> bool:
    """Hand the C heap's free pages back to the kernel (glibc's ``malloc_trim``); False where
    there is no glibc. Loading a model frees as much as it keeps (conversion and merge buffers),
    and glibc keeps freed blocks below its mmap threshold in the process: about 1 GB for the two
    SmolLM2 models, held through the whole repair without this. Compiling a large step frees a few
    hundred MB the same way (`hcnr_jax.stats.engine` trims after each compile)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is None:
        return False
    trim(0)
    return True


@dataclass
class Offloaded:
    """An offloaded tree: host arrays, or (``folder`` set) the files holding them; the leaves'
    dtypes, shapes and shardings."""

    names: list[str]  # HF names (`hcnr_jax.params.flatten`), in the tree's leaf order
    leaves: list[Any]  # np.ndarray (host memory, or an empty array) or the Path of its raw file
    dtypes: list[np.dtype]
    shapes: list[tuple[int, ...]]
    shardings: list[Any]
    treedef: Any
    folder: Path | None

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(s)) * d.itemsize for s, d in zip(self.shapes, self.dtypes, strict=True))

    def get(self, name: str) -> jax.Array:
        """One leaf (by HF name) on its devices, the rest left where it is: a layer of the idle
        model for a step that needs only that layer."""
        i = self.names.index(name)
        return jax.device_put(_host(self.leaves[i], self.dtypes[i], self.shapes[i]), self.shardings[i])


def _host(src: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(src, Path):  # a plain read, nothing mapped: the file can go at once
        return np.fromfile(src, dtype=np.uint8).view(dtype).reshape(shape)
    return src


OWNER = "OWNER"  # in each offload folder: "host pid start", the process that made it


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), which
    tells a reused process id from the owner; None without /proc or for no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]  # the fields after "(comm) ": state is the first (3)


def _owner_line() -> str:
    return f"{socket.gethostname()} {os.getpid()} {_start_time(os.getpid()) or '-'}"


def _owner_gone(folder: Path) -> bool:
    """Whether ``folder``'s owner was a process of this host that no longer runs. A folder without
    an owner file, or of another host, is never taken for gone."""
    try:
        host, pid, start = (folder / OWNER).read_text().split()
        pid_n = int(pid)
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return start != "-" and _start_time(pid_n) not in (None, start)  # the id now names another process


def sweep_stale(parent: str | Path | None = None) -> list[Path]:
    """Delete the ``offload-*`` folders in ``parent`` (default: the system's temporary folder)
    whose owner process is gone (module docstring); returns those deleted."""
    root = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    gone = [f for f in sorted(root.glob("offload-*")) if f.is_dir() and _owner_gone(f)]
    for f in gone:
        shutil.rmtree(f, ignore_errors=True)
    return gone


def can_offload(params: Params) -> bool:
    """True when every leaf is a ``jax.Array`` this process holds whole (not across processes)."""
    leaves = jax.tree.leaves(params)
    return bool(leaves) and all(isinstance(a, jax.Array) and a.is_fully_addressable for a in leaves)


def offload(params: Params, folder: str | Path | None = None) -> Offloaded:
    """Move ``params`` out of device memory (module docstring); the caller drops its own
    references to ``params`` for the memory to be freed. ``folder``: where a CPU's files go (a
    new subfolder of it; default the system's temporary folder)."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    names, leaves = [hf_name(path) for path, _ in with_paths], [a for _, a in with_paths]
    meta = ([np.dtype(a.dtype) for a in leaves], [tuple(a.shape) for a in leaves], [a.sharding for a in leaves])
    if not all(d.platform == "cpu" for a in leaves for d in a.devices()):
        return Offloaded(names, [np.asarray(jax.device_get(a)) for a in leaves], *meta, treedef, None)
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    sweep_stale(folder)
    where = Path(tempfile.mkdtemp(prefix="offload-", dir=folder))
    try:
        (where / OWNER).write_text(_owner_line() + "\n")
        stored: list[Any] = []
        for i, a in enumerate(leaves):
            host = np.ascontiguousarray(np.asarray(a))
            if host.size == 0:
                stored.append(host.copy())
                continue
            path = where / f"{i}.bin"
            host.reshape(-1).view(np.uint8).tofile(path)  # raw bytes: any dtype, bfloat16 included
            stored.append(path)
    except BaseException:
        shutil.rmtree(where, ignore_errors=True)
        raise
    return Offloaded(names, stored, *meta, treedef, where)


def restore(off: Offloaded) -> Params:
    """The offloaded tree back on its devices with its shardings, bit for bit; a CPU's files are
    read one at a time (plain reads, nothing mapped) and deleted."""
    try:
        leaves = []
        for i, (dtype, shape, sharding) in enumerate(zip(off.dtypes, off.shapes, off.shardings, strict=True)):
            src, off.leaves[i] = off.leaves[i], None  # each host copy goes as soon as it is placed
            leaves.append(jax.device_put(_host(src, dtype, shape), sharding))
            del src
    finally:
        discard(off)
    return jax.tree.unflatten(off.treedef, leaves)


def discard(off: Offloaded) -> None:
    """Delete an offloaded tree's files (if any) without restoring it."""
    off.leaves = []
    if off.folder is not None:
        shutil.rmtree(off.folder, ignore_errors=True)


__all__ = ["Offloaded", "can_offload", "discard", "offload", "release_free_heap", "restore", "sweep_stale"]
