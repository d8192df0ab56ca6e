"""Runs an accumulator (``init`` / ``update``) over the batches of a ``Samples`` set.

Side effects live here, not in the math: device placement on a mesh, the jitted step with
explicit in/out shardings, orbax checkpoints of the accumulators every N batches (a killed run
resumes from the last one and ends bit-identical: same batches, same order, same program), the
result folder (``--cache-dir``: results stored under a hash of weights, data and settings), and the
progress bar. How a run goes is one `StatsOptions` value.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hcnr_jax import interrupt, sharding
from hcnr_jax.config import ModelConfig
from hcnr_jax.data.samples import Samples
from hcnr_jax.offload import release_free_heap
from hcnr_jax.params import Params, flatten
from hcnr_jax.stats.options import StatsOptions

log = logging.getLogger(__name__)

# Bumped when a change alters the numbers, so that stale stored results are not reused.
RESULT_VERSION = 2  # 2: Fisher's LM head only at target positions (float rounding)

# In-process memo of jitted steps, so each (update, cfg, static options, mesh, shapes) traces once.
_STEP_MEMO: dict[Any, Callable] = {}


def weights_hash(params: Params) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name, leaf in sorted(flatten(params).items()):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = sharding.tree_to_host(leaf)  # sharded over several processes: gathered (a collective)
        a = np.asarray(leaf)
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def result_key(params: Params, samples: Samples, settings: dict[str, Any]) -> str:
    """The hash a stored result is found by: weights, data, settings and ``RESULT_VERSION``."""
    blob = json.dumps({"version": RESULT_VERSION, "weights": weights_hash(params), "data": samples.sha256,
                       "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _padded_batches(samples: Samples, batch_size: int) -> tuple[dict[str, np.ndarray], int]:
    """All samples padded with empty rows (no tokens, no targets: they add exactly 0) to a whole
    number of batches, so that every step has one shape and compiles once."""
    n = samples.input_ids.shape[0]
    num = -(-n // batch_size)
    pad = num * batch_size - n
    arrays = {
        "input_ids": np.pad(samples.input_ids.astype(np.int32), ((0, pad), (0, 0))),
        "attention_mask": np.pad(samples.attention_mask.astype(bool), ((0, pad), (0, 0))),
        "loss_mask": np.pad(samples.loss_mask.astype(bool), ((0, pad), (0, 0))),
    }
    return arrays, num


def step_and_shardings(update: Callable, cfg: ModelConfig, static: Mapping[str, Any], mesh: jax.sharding.Mesh,
                       fsdp: bool, state: Any, params: Any) -> tuple[Callable, Any, Any, Any]:
    """The jitted step ``(state, params, batch) -> state`` with explicit in/out shardings (weights
    by role, statistics like their weight's neuron axis, the batch over ``data``; the state is
    donated), compiled once per (update, cfg, ``static`` keyword arguments of ``update``, mesh,
    shapes). ``state`` and ``params`` may be abstract (``jax.ShapeDtypeStruct``): ``hcnr_jax.plan``
    lowers the very same step."""
    static_t = tuple(sorted(static.items()))  # hashable, in one order
    shapes = tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves((state, params)))
    key = (update, cfg, static_t, mesh, fsdp, jax.tree.structure((state, params)), shapes)
    state_sh = sharding.stat_shardings(state, mesh, neuron_axis=static.get("neuron_axis", "input"), fsdp=fsdp)
    param_sh = sharding.param_shardings(params, mesh, fsdp)
    batch_sh = sharding.batch_sharding(mesh)
    if key not in _STEP_MEMO:
        def step(state, params, batch):
            return update(state, params, batch, cfg=cfg, **dict(static_t))

        _STEP_MEMO[key] = jax.jit(step, in_shardings=(state_sh, param_sh, batch_sh), out_shardings=state_sh,
                                  donate_argnums=0)
    return _STEP_MEMO[key], state_sh, param_sh, batch_sh


def _checkpointer(path: Path) -> Any:
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
    return ocp.CheckpointManager(path.absolute(), options=options)


def _resume(path: Path, abstract: Any, num_batches: int) -> tuple[Any, Any, int]:
    """(checkpoint manager, restored state or None, batches done) for the checkpoints at ``path``.
    A checkpoint that cannot be read, has other shapes, holds NaN or infinity or counts more
    batches than there are is damaged: it is moved aside (``io.set_aside``, with a warning) and
    the accumulation starts again from zero."""
    import orbax.checkpoint as ocp

    from hcnr_jax.io import set_aside

    mngr = None
    try:
        mngr = _checkpointer(path)
        latest = mngr.latest_step()
        if latest is None:
            return mngr, None, 0
        if not 0 < int(latest) <= num_batches:
            raise ValueError(f"step {latest} is not between 1 and the {num_batches} batches of this run")
        state = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
        got = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), state)
        want = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), abstract)
        if got != want:
            raise ValueError("its arrays do not match this run's accumulators")
        bad = sum(not bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(state))  # one scalar each
        if bad:
            raise ValueError(f"{bad} accumulator(s) hold NaN or infinite values")
        return mngr, state, int(latest)
    except Exception as e:  # orbax raises many kinds (FileNotFoundError, ValueError, json, tensorstore)
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if mngr is not None:
        with contextlib.suppress(Exception):  # closing a manager on a damaged directory may fail too
            mngr.close()
    _quiet_orbax_leftovers()
    if path.exists() and jax.process_index() == 0:
        set_aside(path, reason if len(reason) <= 240 else reason[:240] + " ...")
    return _checkpointer(path), None, 0


_HOOKED = False


def _quiet_orbax_leftovers() -> None:
    """A failed orbax restore abandons its other reads. Their errors are logged by asyncio (tasks
    whose exception nobody retrieved) and, when tensorstore completes them later on the closed
    event loop, printed as unraisable ``RuntimeError: Event loop is closed``: a dozen tracebacks
    after a failure that the caller reports once. Collect the tasks without their logs now, and
    from now on drop exactly those unraisable errors (others still reach the previous hook)."""
    import gc
    import sys

    global _HOOKED

    def drop(record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in record.getMessage()

    logger = logging.getLogger("asyncio")
    logger.addFilter(drop)
    try:
        gc.collect()
    finally:
        logger.removeFilter(drop)
    if not _HOOKED:
        previous = sys.unraisablehook

        def hook(unraisable: Any) -> None:
            e = unraisable.exc_value
            if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
                previous(unraisable)

        sys.unraisablehook = hook
        _HOOKED = True


def accumulate(
    init: Callable[[Params], Any],
    update: Callable,
    params: Params,
    cfg: ModelConfig,
    samples: Samples,
    static: Mapping[str, Any],
    options: StatsOptions,
    *,
    checkpoint_dir: str | Path | None = None,
    desc: str = "stats",
) -> dict[str, np.ndarray]:
    """Sum ``update`` over all samples; returns the accumulators as host float32 arrays.

    ``init(params)`` gives the zero state; ``update(state, params, batch, cfg=cfg, **static)`` adds
    one batch (``static``: hashable values, static under jit). ``options``: the mesh (None: every
    device on ``data``), batch size (rounded up to a multiple of the ``data`` axis), progress bar,
    ``on_batch`` callback and ``checkpoint_every``: with ``checkpoint_dir`` the accumulators are
    saved every that many batches and a rerun resumes from the latest save.
    """
    mesh = options.mesh if options.mesh is not None else sharding.make_mesh()
    fsdp, checkpoint_every = options.fsdp, options.checkpoint_every
    data_size = mesh.shape[sharding.DATA]
    batch_size = -(-max(options.batch_size, 1) // data_size) * data_size
    arrays, num_batches = _padded_batches(samples, batch_size)

    state0 = jax.eval_shape(init, params)
    step, state_sh, param_sh, batch_sh = step_and_shardings(update, cfg, static, mesh, fsdp, state0, params)
    dev_params = sharding.put_tree(params, param_sh)
    state = jax.tree.map(lambda s, sh: sharding.put(np.zeros(s.shape, s.dtype), sh), state0, state_sh)

    start, mngr = 0, None
    if checkpoint_dir is not None and checkpoint_every > 0:
        abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state0, state_sh)
        mngr, restored, start = _resume(Path(checkpoint_dir), abstract, num_batches)
        if restored is not None:
            state = restored
            log.info("%s: resumed from %s after %d of %d batches", desc, checkpoint_dir, start, num_batches)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(samples), initial=min(start * batch_size, len(samples)), unit="sample", desc=desc,
               disable=not options.progress or jax.process_index() != 0, dynamic_ncols=True)

    def batch_at(b: int) -> dict[str, jax.Array]:
        sl = slice(b * batch_size, (b + 1) * batch_size)
        return {k: sharding.put(v[sl], batch_sh) for k, v in arrays.items()}

    if start < num_batches and hasattr(step, "lower"):  # a jitted step (a wrapper of one is run as it is)
        # Compiled before the first step runs (the call below finds it in jit's cache), so that what
        # the compiler freed (a few hundred MB for a 30-block model) goes back to the kernel first
        # rather than sitting beside the step's temporaries.
        step.lower(state, dev_params, batch_at(start)).compile()
        release_free_heap()
    try:  # closed before an error message (Ctrl-C included) is printed below it
        for b in range(start, num_batches):
            batch = batch_at(b)
            state = step(state, dev_params, batch)
            if not bar.disable:
                # Steps dispatch asynchronously: without waiting, the bar (and its samples/s) would
                # run ahead of the computation and jump to the end.
                jax.block_until_ready(state)
            done = b + 1
            if mngr is not None and (done % checkpoint_every == 0) and done < num_batches:
                _save_now(mngr, done, state, checkpoint_dir)
            bar.update(min(done * batch_size, len(samples)) - bar.n)
            if options.on_batch is not None:
                options.on_batch(done)
            if done < num_batches:
                save = None if mngr is None else functools.partial(_save_now, mngr, done, state, checkpoint_dir)
                interrupt.check(state, save=save, where=f"{desc}: after batch {done} of {num_batches}")
    finally:
        bar.close()
    result = sharding.tree_to_host(state)
    if mngr is not None:
        mngr.close()
    return result


def _save_now(mngr: Any, done: int, state: Any, checkpoint_dir: str | Path | None) -> str:
    import orbax.checkpoint as ocp

    if mngr.latest_step() != done:
        mngr.save(done, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
    return f"progress saved in {checkpoint_dir}; rerun the same command to resume"


def _read_result(path: Path, key: str, expected: dict[str, tuple[int, ...]] | None) -> dict[str, np.ndarray]:
    """The cached result at ``path``; ValueError saying why when it is damaged (unreadable, another
    key, tensors missing, unexpected or of the wrong shape, NaN or infinity)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            names = list(f.keys())  # safe_open objects are not iterable
            result = {k: f.get_tensor(k) for k in names}
    except Exception as e:  # SafetensorError, OSError, ...: a torn or overwritten file
        raise ValueError(f"unreadable: {e}") from e
    if meta.get("key") != key:
        raise ValueError(f"its metadata names key {meta.get('key')!r}, not {key!r}")
    if expected is not None:
        if set(result) != set(expected):
            diff = sorted(set(result) ^ set(expected))
            raise ValueError(f"tensor {diff[0]} is {'unexpected' if diff[0] in result else 'missing'}"
                             + (f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""))
        for k, shape in expected.items():
            if tuple(result[k].shape) != tuple(shape):
                raise ValueError(f"tensor {k} has shape {tuple(result[k].shape)}, expected {tuple(shape)}")
    for k, v in result.items():
        if v.dtype != np.float32:
            raise ValueError(f"tensor {k} is {v.dtype}, not float32")
        if not np.isfinite(v).all():
            raise ValueError(f"tensor {k} holds NaN or infinite values")
    return result


def stored_or_computed(kind: str, settings: dict[str, Any], params: Params, samples: Samples,
                       cache_dir: str | Path | None, compute: Callable[[Path | None], dict[str, np.ndarray]],
                       *, expected: dict[str, tuple[int, ...]] | None = None, lock_timeout: float | None = None,
                       ) -> dict[str, np.ndarray]:
    """``compute(checkpoint_dir)`` unless the result folder ``cache_dir`` (``--cache-dir``) already
    holds the result for these weights, data and settings. The result is stored as safetensors; checkpoints live beside it until the
    run completes.

    An entry is computed under a lock (``KIND-KEY.lock``, `hcnr_jax.io.file_lock`): a second run
    needing the same entry waits for the first (up to ``lock_timeout`` seconds, default
    ``io.LOCK_TIMEOUT_S``), then reads its result. A cached result that fails to load or check
    (``expected``: name -> shape; float32, finite) is moved aside with a warning and recomputed.
    A result holding NaN or infinity is an `HcnrError` naming the tensor; nothing is cached."""
    if cache_dir is None:
        return compute(None)
    from safetensors.numpy import save

    from hcnr_jax.io import LOCK_TIMEOUT_S, atomic_write_bytes, check_finite_tensors, file_lock, set_aside

    key = result_key(params, samples, {"kind": kind, **settings})[:32]
    cache_dir = Path(cache_dir)
    result_path = cache_dir / f"{kind}-{key}.safetensors"
    ckpt = cache_dir / f"{kind}-{key}.ckpt"
    if jax.process_count() > 1:
        # Every process must take the same path (the accumulation is collective): no per-process lock.
        lock: Any = contextlib.nullcontext()
    else:
        lock = file_lock(cache_dir / f"{kind}-{key}.lock", what=f"cache entry {cache_dir / f'{kind}-{key}'}",
                         timeout=LOCK_TIMEOUT_S if lock_timeout is None else lock_timeout)
    with lock:
        if result_path.is_file():
            try:
                result = _read_result(result_path, key, expected)
                log.info("%s: cache hit %s", kind, result_path)
                return result
            except ValueError as e:
                if jax.process_index() == 0:
                    set_aside(result_path, str(e))
        result = compute(ckpt)
        try:
            check_finite_tensors(result, result_path, what=f"{kind} of")
        except Exception:
            shutil.rmtree(ckpt, ignore_errors=True)  # its accumulators are not finite either
            raise
        if jax.process_index() == 0:
            meta = {"kind": kind, "key": key, "data_sha256": samples.sha256, "num_samples": str(len(samples)),
                    **{k: str(v) for k, v in settings.items()}}
            atomic_write_bytes(result_path, save({k: np.ascontiguousarray(v) for k, v in result.items()},
                                                 metadata=meta))
            shutil.rmtree(ckpt, ignore_errors=True)
    return result
