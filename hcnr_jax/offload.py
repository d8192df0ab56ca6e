"""A parameter tree moved out of the memory the computation runs in, and back.

A repair holds two models, but each of its statistics passes runs on one of them (the honesty
Fisher on the base, the task Fisher on the fine-tuned model, the Hessians on ``calib_model``).
While one pass runs, the other model waits here:

- on an accelerator, in host memory (``jax.device_get``), leaving the device a whole model freer;
- on a CPU, where host memory is the device's, in raw files of a folder (the repair's run
  folder, or a temporary one): the kernel's page cache holds them, and drops them under pressure.

`restore` puts every leaf back with its sharding, bit for bit, and deletes the files. Only trees
whose arrays this process can address whole are offloaded (one process; any mesh within it).
"""

from __future__ import annotations

import shutil
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
    where = Path(tempfile.mkdtemp(prefix="offload-", dir=folder))
    try:
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


__all__ = ["Offloaded", "can_offload", "discard", "offload", "release_free_heap", "restore"]
