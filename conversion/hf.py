"""Hugging Face model directories (config.json + safetensors, single or sharded) <-> params.

One strict driver for every family: the family's tensor table (`hcnr_jax.params.param_specs`)
says which tensors must exist and their shapes; every tensor in the files is consumed exactly
once, every leaf is filled exactly once, and anything else is an error naming the file and
tensor. Tensors are read one at a time from memory-mapped files, so loading never holds two
copies of the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
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
    the target's range, e.g. 1e5 in float16) is a `CheckpointError` naming ``source`` and the tensor."""
    target = np.dtype(target)
    if array.dtype == target:
        return array
    with np.errstate(over="ignore", invalid="ignore"):
        out = array.astype(target)
    if target.kind == "f" or target == DTYPES["bfloat16"]:
        overflow = _nonfinite(out)
        if overflow.any():
            overflow &= ~_nonfinite(array)
            n = int(np.count_nonzero(overflow))
            if n:
                largest = float(np.max(np.abs(array[overflow].astype(np.float64))))
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
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {model_dir} a Hugging Face model directory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


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


def read_tensors(
    files: Mapping[str, Path],
    specs: Mapping[str, tuple[int, ...]],
    convert: Callable[[str, np.ndarray], Any],
    source: str,
) -> dict[str, Any]:
    """Read every tensor of ``specs`` from ``files``, one at a time; strict on names and shapes."""
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
        with _open(path) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{path}: index lists tensor {name}, but the file lacks it")
                try:
                    array = f.get_tensor(name)
                except (SafetensorError, ValueError) as e:
                    raise CheckpointError(f"{path}: cannot read tensor {name} ({e})") from e
                if tuple(array.shape) != tuple(specs[name]):
                    raise CheckpointError(
                        f"{path}: tensor {name} has shape {tuple(array.shape)}, config implies "
                        f"{tuple(specs[name])} (does config.json match the weights?)"
                    )
                if array.dtype not in DTYPES.values():
                    raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {array.dtype}")
                out[name] = convert(name, array)
                del array
    return {name: out[name] for name in specs}


def load_params(
    model_dir: Path,
    dtype: str | None = None,
    place: Callable[[str, np.ndarray], Any] | None = None,
) -> tuple[ModelConfig, dict[str, Any], Params]:
    """Read a HF directory -> (config, raw config.json dict, params).

    ``dtype`` casts every tensor (None keeps the stored dtype). ``place`` turns each numpy tensor
    into the stored leaf (default ``jnp.asarray``; pass a ``jax.device_put`` with a sharding to
    load straight onto a mesh).
    """
    import jax.numpy as jnp

    model_dir = Path(model_dir)
    hf = read_config(model_dir)
    cfg = config_from_hf(hf, source=str(model_dir / "config.json"))
    place = place or (lambda name, a: jnp.asarray(a))
    target = DTYPES[dtype] if dtype else None

    files = weight_map(model_dir)

    def convert(name: str, array: np.ndarray) -> Any:
        if target is not None and array.dtype != target:
            array = cast_checked(array, target, name, str(files[name]))
        return place(name, array)

    flat = read_tensors(files, param_specs(cfg), convert, str(model_dir))
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


def config_with_dtype(hf: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """config.json contents with the stored dtype set (both spellings transformers reads)."""
    out = dict(hf)
    out["dtype"] = dtype
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype
    return out

