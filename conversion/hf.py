"""Hugging Face model directories (config.json + safetensors, single or sharded) <-> params.

One strict driver for every family: the family's tensor table (`hcnr_jax.params.param_specs`)
says which tensors must exist and their shapes; every tensor in the files is consumed exactly
once, every leaf is filled exactly once, and anything else is an error naming the file and
tensor.

Loading streams: ``safe_open`` checks each file's header (the errors name the file), then every
tensor is read on its own, at its header offsets, into a fresh host buffer, cast if asked, placed
on its device (or its sharded placement on a mesh) and released before the next one. Nothing
maps the whole file, so the peak host memory is the placed model plus about one tensor; on the
CPU the placed array takes over the buffer without a copy (``device_put(..., may_alias=True)``).
On a mesh spanning several processes, each process reads only the first-axis rows its own devices
hold of each tensor (one contiguous byte range), not the whole checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from hcnr_jax.config import ModelConfig, config_from_hf
from hcnr_jax.errors import CheckpointError
from hcnr_jax.params import Params, param_specs, unflatten

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


# safetensors dtype codes -> numpy: the three above are read, the others named in the error.
_FILE_DTYPES: dict[str, Any] = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
    "U8": np.uint8, "BOOL": np.bool_,
}
_ALIGN = 64  # host buffers start on a 64-byte boundary, so the CPU client can use them in place
_CHUNK = 1 << 20  # elements per step of a cast's overflow check (bounded temporaries)


def dtype_name(dtype: Any) -> str:
    dt = np.dtype(dtype)
    for name, candidate in DTYPES.items():
        if dt == candidate:
            return name
    raise CheckpointError(f"unsupported parameter dtype {dt}")


def _nonfinite(array: np.ndarray) -> np.ndarray:
    return ~np.isfinite(array)


def cast_checked(array: np.ndarray, target: Any, name: str, source: str) -> np.ndarray:
    """``array`` cast to ``target``; a value finite before the cast and infinite after (it exceeds
    the target's range, e.g. 1e5 in float16) is a `CheckpointError` naming ``source`` and the tensor.

    The result is a fresh aligned array (`_host_buffer`); the overflow check runs in chunks, so
    the cast needs no more host memory than its input and output."""
    target = np.dtype(target)
    if array.dtype == target:
        return array
    out = _host_buffer(array.size * target.itemsize).view(target).reshape(array.shape)
    with np.errstate(over="ignore", invalid="ignore"):
        np.copyto(out, array, casting="unsafe")
    if target.kind == "f" or target == DTYPES["bfloat16"]:
        flat_in, flat_out = array.reshape(-1), out.reshape(-1)
        n, largest = 0, 0.0
        for start in range(0, flat_out.size, _CHUNK):
            overflow = _nonfinite(flat_out[start:start + _CHUNK])
            if overflow.any():
                chunk = flat_in[start:start + _CHUNK]
                overflow &= ~_nonfinite(chunk)
                k = int(np.count_nonzero(overflow))
                if k:
                    n += k
                    largest = max(largest, float(np.max(np.abs(chunk[overflow].astype(np.float64)))))
        if n:
            limit = float(ml_dtypes.finfo(target).max)
            raise CheckpointError(
                f"{source}: tensor {name}: casting to {dtype_name(target)} overflows ({n} value(s) up to "
                f"{largest:.4g} exceed its maximum {limit:.4g}); choose a wider dtype (float32 or bfloat16)")
    return out


def nonfinite_error(name: str, count: int, dest: Any = None) -> CheckpointError:
    where = f"{dest}: " if dest is not None else ""
    return CheckpointError(f"{where}tensor {name} holds {count} NaN or infinite value(s); refusing to write it "
                           "(allow_nonfinite=True writes it anyway)")


def read_config(model_dir: Path) -> dict[str, Any]:
    from hcnr_jax.schema import read_json_object

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {model_dir} a Hugging Face model directory?)")
    return read_json_object(path)


def _shard_name(index: Path, tensor: str, fname: object) -> str:
    """A ``weight_map`` value checked to name a file inside the model directory: a relative path
    without ``..`` (an index must not make us read ``../../x`` or ``/etc/...``). Symlinks inside the
    directory are fine (the Hugging Face cache links shards to its blob store)."""
    if not isinstance(fname, str) or not fname:
        raise CheckpointError(f"{index}: weight_map entry {tensor!r} is {fname!r}, not a shard file name")
    if Path(fname).is_absolute() or ".." in Path(fname).parts or "\\" in fname:
        raise CheckpointError(f"{index}: weight_map entry {tensor!r} -> {fname!r} points outside the model "
                              "directory; shard files must be named relative to it, without '..'")
    return fname


def weight_map(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, from the index (sharded) or the single file."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        if not isinstance(mapping, dict):
            raise CheckpointError(f"{index}: weight_map is a {type(mapping).__name__}, not a mapping of tensor "
                                  "names to shard files")
        files = {name: model_dir / _shard_name(index, name, fname) for name, fname in mapping.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{index}: lists shard {f.name}, which does not exist")
        return files
    single = model_dir / SINGLE_NAME
    if single.is_file():
        with _open(single) as f:
            return dict.fromkeys(list(f.keys()), single)
    raise CheckpointError(f"{model_dir}: no {SINGLE_NAME} or {INDEX_NAME} found")


class _open:
    """``safe_open`` whose header errors name the file."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Any:
        try:
            self._cm = safe_open(str(self.path), framework="numpy")
            return self._cm.__enter__()
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: cannot read safetensors file ({e})") from e

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data, tensor name -> header entry) of a safetensors file, read after
    ``safe_open`` has checked the header (JSON, offsets contiguous and inside the file)."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return 8 + n, header


def _host_buffer(nbytes: int) -> np.ndarray:
    """An uninitialised ``uint8[nbytes]`` starting on an `_ALIGN`-byte boundary."""
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + nbytes]


@contextlib.contextmanager
def _plain_pages() -> Iterator[None]:
    """numpy advises the kernel to back large arrays with transparent huge pages; where the kernel
    then compacts memory on a fault (THP ``defrag=madvise``, a common default) a read into fresh
    buffers stalls now and then: here the same 516 MB model read in 0.26 s or 0.48 s, at random,
    against a steady 0.29 s on plain pages. Buffers written once by read() are better off plain."""
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # a numpy without the switch: leave its default
        yield
        return
    previous = _set_madvise_hugepage(False)
    try:
        yield
    finally:
        _set_madvise_hugepage(previous)


def _read_at(fh: Any, offset: int, buf: np.ndarray) -> int:
    """Fill ``buf`` from ``fh`` at ``offset``; returns the bytes read (fewer: the file ended)."""
    view = memoryview(buf)
    fh.seek(offset)
    done = 0
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            break
        done += n
    return done


# Bytes of tensor data read by `read_tensors` in this process (for tests and benchmarks).
BYTES_READ = [0]


def _read_file(fh: Any, path: Path, names: list[str], specs: Mapping[str, tuple[int, ...]],
               convert: Callable[..., Any], out: dict[str, Any],
               rows: Callable[[str], tuple[int, int]] | None = None) -> None:
    """`read_tensors` for the ``names`` held by one file, open as ``fh``."""
    data_start, header = _header(path)
    for name in names:
        entry = header.get(name)
        if entry is None:
            raise CheckpointError(f"{path}: index lists tensor {name}, but the file lacks it")
        shape = tuple(entry["shape"])
        if shape != tuple(specs[name]):
            raise CheckpointError(
                f"{path}: tensor {name} has shape {shape}, config implies "
                f"{tuple(specs[name])} (does config.json match the weights?)"
            )
        code = entry["dtype"]
        dtype = np.dtype(_FILE_DTYPES[code]) if code in _FILE_DTYPES else None
        if dtype not in DTYPES.values():
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype or code}")
        begin, end = entry["data_offsets"]
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name} holds {end - begin} bytes, its shape and dtype "
                                  f"need {int(np.prod(shape)) * dtype.itemsize}")
        # Rows r0:r1 of a row-major tensor are one contiguous run of bytes: a process that holds
        # only some rows of its shards reads only those.
        r0, r1 = rows(name) if rows is not None and shape else (0, shape[0] if shape else 1)
        row_bytes = (end - begin) // shape[0] if shape else end - begin
        lo, hi = begin + r0 * row_bytes, begin + r1 * row_bytes
        buf = _host_buffer(hi - lo)
        try:
            got = _read_at(fh, data_start + lo, buf)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({e})") from e
        if got != hi - lo:
            raise CheckpointError(f"{path}: cannot read tensor {name} (the file ends after {got} of "
                                  f"its {end - begin} bytes)")
        BYTES_READ[0] += got
        block = buf.view(dtype).reshape((r1 - r0, *shape[1:]) if shape else shape)
        out[name] = convert(name, block) if (r0, r1) == (0, shape[0] if shape else 1) else convert(name, block, r0)
        del buf, block


def read_tensors(
    files: Mapping[str, Path],
    specs: Mapping[str, tuple[int, ...]],
    convert: Callable[..., Any],
    source: str,
    rows: Callable[[str], tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Read every tensor of ``specs`` from ``files``, one at a time; strict on names and shapes.

    Each tensor is read into a fresh host array of its own (never a view of a file mapping),
    handed to ``convert(name, array)`` and dropped: ``convert`` may keep or alias it.
    ``rows(name) -> (r0, r1)``: read only those rows (of the first axis); the block then goes to
    ``convert(name, block, r0)``."""
    missing = [n for n in specs if n not in files]
    if missing:
        raise CheckpointError(
            f"{source}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    unexpected = [n for n in files if n not in specs]
    if unexpected:
        raise CheckpointError(
            f"{files[unexpected[0]]}: unexpected tensor {unexpected[0]} for this config"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + " (does config.json match the weights?)"
        )
    out: dict[str, Any] = {}
    by_file: dict[Path, list[str]] = {}
    for name in specs:
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        with _open(path):  # the header check, with its errors; the data is read below
            pass
        try:
            with open(path, "rb", buffering=0) as fh, _plain_pages():
                _read_file(fh, path, names, specs, convert, out, rows)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
    return {name: out[name] for name in specs}


def load_params(
    model_dir: Path,
    dtype: str | None = None,
    place: Callable[[str, np.ndarray], Any] | None = None,
    *,
    mesh: Any = None,
    fsdp: bool = False,
) -> tuple[ModelConfig, dict[str, Any], Params]:
    """Read a HF directory -> (config, raw config.json dict, params).

    ``dtype`` casts every tensor (None keeps the stored dtype). ``mesh`` (a ``jax.sharding.Mesh``)
    places each tensor straight into its sharding by role (`hcnr_jax.sharding.tensor_shardings`,
    ``fsdp`` as there) as it is read; without one tensors go to the default device. ``place``
    (instead of ``mesh``) turns each host tensor into the stored leaf itself. Each placement is
    waited for before the next tensor is read, so one host buffer is alive at a time.
    """
    import jax

    if mesh is not None and place is not None:
        raise ValueError("load_params: give mesh or place, not both")
    model_dir = Path(model_dir)
    hf = read_config(model_dir)
    cfg = config_from_hf(hf, source=str(model_dir / "config.json"))
    specs = param_specs(cfg)
    rows = None
    if mesh is not None:
        from hcnr_jax import sharding

        shardings = sharding.tensor_shardings(specs, mesh, fsdp)

        def place(name: str, a: np.ndarray, row0: int = 0) -> Any:
            return sharding.put(a, shardings[name], shape=specs[name], row0=row0)

        if jax.process_count() > 1:
            # Each process reads only the rows its own devices hold (`sharding.local_rows`).
            def rows(name: str) -> tuple[int, int]:
                return sharding.local_rows(shardings[name], specs[name])
    elif place is None:
        def place(name: str, a: np.ndarray) -> Any:
            # The buffer is ours alone (read_tensors): the CPU client may keep it, uncopied.
            return jax.device_put(a, may_alias=True)
    target = DTYPES[dtype] if dtype else None

    files = weight_map(model_dir)

    def convert(name: str, array: np.ndarray, *row0: int) -> Any:
        if target is not None and array.dtype != target:
            array = cast_checked(array, target, name, str(files[name]))
        return jax.block_until_ready(place(name, array, *row0))

    flat = read_tensors(files, specs, convert, str(model_dir), rows)
    return cfg, hf, unflatten(flat, cfg.num_layers)


def shard_plan(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, order-preserving split of tensors into shards of at most ``max_shard_bytes``
    (a single larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_weights(
    tensors: Mapping[str, Any], out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    allow_nonfinite: bool = False,
) -> list[str]:
    """Write tensors (any array type np.asarray accepts) as safetensors shards, HF-style.

    One file is ``model.safetensors``; more are ``model-0000i-of-0000n.safetensors`` with an
    index. Tensors are materialised on the host one shard at a time. Returns the file names.
    A tensor holding NaN or infinite values is a `CheckpointError` naming it, unless
    ``allow_nonfinite``.
    """
    sizes = [(n, int(np.prod(np.shape(a))) * np.dtype(a.dtype).itemsize) for n, a in tensors.items()]
    plan = shard_plan(sizes, max_shard_bytes)
    total = sum(s for _, s in sizes)
    names = (
        [SINGLE_NAME]
        if len(plan) == 1
        else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    )
    weight_index: dict[str, str] = {}
    for fname, shard in zip(names, plan, strict=True):
        arrays = {n: np.ascontiguousarray(np.asarray(tensors[n])) for n in shard}
        if not allow_nonfinite:
            for n, a in arrays.items():
                if a.dtype.kind == "f" or a.dtype == DTYPES["bfloat16"]:
                    bad = int(np.count_nonzero(_nonfinite(a)))
                    if bad:
                        raise nonfinite_error(n, bad)
        save_file(arrays, str(Path(out_dir) / fname), metadata={"format": "pt"})
        weight_index.update({n: fname for n in shard})
        del arrays
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_index}
        (Path(out_dir) / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


def with_legacy_rope(hf: Mapping[str, Any]) -> dict[str, Any]:
    """config.json contents that transformers 4.x reads as 5.x does. transformers 5 spells RoPE
    settings ``rope_parameters`` (per layer type for Gemma 3), which 4.57 ignores, silently falling
    back to its default base; so the 4.x keys are added beside it: ``rope_theta``, ``rope_scaling``
    (when not the default RoPE) and, for per-layer-type parameters, ``rope_local_base_freq`` of the
    sliding layers. Keys already set are kept; transformers 5 and `config_from_hf` read
    ``rope_parameters`` first."""
    out = dict(hf)
    params = out.get("rope_parameters")
    if not isinstance(params, Mapping) or not params:
        return out
    if all(isinstance(v, Mapping) for v in params.values()):
        local = params.get("sliding_attention") or {}
        if "rope_theta" in local:
            out.setdefault("rope_local_base_freq", local["rope_theta"])
        params = params.get("full_attention") or {}
    if "rope_theta" in params:
        out.setdefault("rope_theta", params["rope_theta"])
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if (scaling.get("rope_type") or scaling.get("type") or "default") != "default" and out.get("rope_scaling") is None:
        out["rope_scaling"] = scaling
    return out


def config_with_dtype(hf: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """config.json contents with the stored dtype set (both spellings transformers reads)."""
    out = dict(hf)
    out["dtype"] = dtype
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype
    return out

