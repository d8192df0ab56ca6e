"""The training loop: optax on the project's own ``forward``, data-parallel over a mesh, resumable.

One optimizer step sees ``batch_size * grad_accum`` samples: the micro-batches are stacked
``[grad_accum, batch_size, T]`` and a ``lax.scan`` inside one jitted step sums their gradients,
so accumulation costs no extra host round trips. Rows are cut to the batch's longest sequence,
rounded up to a multiple of ``LENGTH_BUCKET`` (one compilation per bucket, few per run). The LM head
runs only at target positions (``losses.token_logprobs``), in a capacity fixed by the whole data set.

Determinism: the data order of epoch e is a permutation seeded by ``(seed, e)`` and a step's
batch is a function of the step number alone, so a run resumed from an orbax checkpoint of
(trainable, optimizer state) reaches the same weights as an uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hcnr_jax import interrupt, sharding
from hcnr_jax.config import ModelConfig
from hcnr_jax.data.samples import Samples
from hcnr_jax.errors import DataError, HcnrError
from hcnr_jax.io import atomic_write_text
from hcnr_jax.params import Params
from hcnr_jax.stats.fisher_accum import target_capacity
from hcnr_jax.train import lora as lora_lib
from hcnr_jax.train import losses
from hcnr_jax.train.config import TrainConfig

log = logging.getLogger(__name__)

LENGTH_BUCKET = 32
CHECKPOINT_FORMAT = 1  # bump when what a checkpoint holds changes


@dataclass
class TrainResult:
    """``trainable``: the adapter (LoRA) or the full params, on the host; ``params``: the effective
    model params (adapter merged); ``history``: one dict per optimizer step; ``report``: settings,
    data, timing."""

    trainable: Any
    params: Params
    history: list[dict] = field(default_factory=list)
    report: dict = field(default_factory=dict)


def data_arrays(data: Any) -> dict[str, np.ndarray]:
    """The per-sample arrays of ``Samples`` (SFT) or ``PairSamples`` (DPO/ORPO), keyed as the
    losses read them; every array's first axis is the sample."""
    if isinstance(data, Samples):
        return dict(input_ids=data.input_ids, attention_mask=data.attention_mask, loss_mask=data.loss_mask)
    names = [n for n in vars(data) if n.startswith(("chosen_", "rejected_"))]
    return {n: getattr(data, n) for n in names}


def _masks(arrays: dict[str, np.ndarray]) -> list[str]:
    return [k for k in arrays if k.endswith("attention_mask")]


def optimizer(tc: TrainConfig, num_steps: int) -> optax.GradientTransformation:
    """AdamW with warm-up then ``tc.schedule`` decay to 0, after global-norm clipping."""
    warm = int(tc.warmup_ratio * num_steps)
    if tc.schedule == "cosine":
        sched = optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, warm, max(num_steps, warm + 1), 0.0)
    else:
        end = 0.0 if tc.schedule == "linear" else tc.learning_rate
        sched = optax.join_schedules([optax.linear_schedule(0.0, tc.learning_rate, max(warm, 1)),
                                      optax.linear_schedule(tc.learning_rate, end, max(num_steps - warm, 1))], [warm])
    parts = [optax.clip_by_global_norm(tc.max_grad_norm)] if tc.max_grad_norm > 0 else []
    return optax.chain(*parts, optax.adamw(sched, weight_decay=tc.weight_decay))


def loss_fn(trainable: Any, frozen: Params | None, batch: dict[str, jax.Array], *, cfg: ModelConfig,
            tc: TrainConfig, capacity: int) -> tuple[jax.Array, dict]:
    """The objective of one micro-batch; pure. ``frozen`` is the base under LoRA, None otherwise."""
    params = lora_lib.merged(frozen, trainable, tc.lora_scaling) if frozen is not None else trainable
    if tc.objective == "sft":
        return losses.sft_loss(params, cfg, batch, capacity)
    lp = losses.preference_logps(params, cfg, batch, capacity)
    if tc.objective == "dpo":
        per, metrics = losses.dpo_loss(lp["chosen_logp"], lp["rejected_logp"], batch["ref_chosen_logp"],
                                       batch["ref_rejected_logp"], tc.beta)
    else:
        per, metrics = losses.orpo_loss(lp["chosen_mean_logp"], lp["rejected_mean_logp"], lp["chosen_nll"],
                                        tc.orpo_lambda)
    return jnp.mean(per), {k: jnp.mean(v) for k, v in metrics.items()}


def make_step(cfg: ModelConfig, tc: TrainConfig, opt: optax.GradientTransformation, capacity: int) -> Callable:
    """``step(trainable, opt_state, frozen, micro) -> (trainable, opt_state, loss)``, jitted;
    ``micro`` holds arrays ``[grad_accum, batch_size, ...]``."""

    def step(trainable: Any, opt_state: Any, frozen: Params | None, micro: dict[str, jax.Array]) -> tuple:
        grad = jax.value_and_grad(lambda t, b: loss_fn(t, frozen, b, cfg=cfg, tc=tc, capacity=capacity),
                                  has_aux=True)

        def body(carry: tuple, batch: dict[str, jax.Array]) -> tuple:
            acc, total = carry
            (loss, _), g = grad(trainable, batch)
            return (jax.tree.map(jnp.add, acc, g), total + loss), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (g, total), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), micro)
        n = next(iter(micro.values())).shape[0]
        g = jax.tree.map(lambda x: x / n, g)
        updates, opt_state = opt.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, total / n

    return jax.jit(step, donate_argnums=(0, 1))


def step_indices(step: int, n: int, per_step: int, seed: int) -> np.ndarray:
    """Sample indices of optimizer step ``step`` (0-based): a slice of epoch e's seeded permutation."""
    steps_per_epoch = n // per_step
    epoch, j = divmod(step, steps_per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[j * per_step : (j + 1) * per_step]


def micro_batch(arrays: dict[str, np.ndarray], idx: np.ndarray, accum: int) -> dict[str, np.ndarray]:
    """Rows ``idx`` as ``[accum, batch, ...]``, sequences cut to the bucketed longest real length."""
    masks = _masks(arrays)
    t_max = next(iter(arrays[m] for m in masks)).shape[1]
    longest = max(int(arrays[m][idx].sum(axis=1).max()) for m in masks)
    t = min(-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, t_max)
    out = {}
    for k, v in arrays.items():
        rows = v[idx][:, :t] if v.ndim == 2 else v[idx]
        out[k] = rows.reshape(accum, len(idx) // accum, *rows.shape[1:])
    return out


def num_steps(tc: TrainConfig, n: int) -> int:
    per_step = tc.batch_size * tc.grad_accum
    if n < per_step:
        raise DataError(f"{n} training samples are fewer than one step's batch_size * grad_accum = {per_step}")
    return tc.max_steps or max(1, math.ceil(tc.epochs * (n // per_step)))


def reference_logps(params: Params, cfg: ModelConfig, arrays: dict[str, np.ndarray], batch_size: int,
                    capacity: int) -> dict[str, np.ndarray]:
    """DPO's reference: summed log-probs of chosen and rejected under the starting model, computed
    once before training (the same ``forward``; no second model)."""
    fn = jax.jit(lambda p, b: losses.preference_logps(p, cfg, b, capacity))
    n = len(next(iter(arrays.values())))
    chosen, rejected = [], []
    for s in range(0, n, batch_size):
        idx = np.arange(s, min(s + batch_size, n))
        idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])  # one shape per bucket
        mb = {k: v[0] for k, v in micro_batch(arrays, idx, 1).items()}
        lp = fn(params, mb)
        keep = min(batch_size, n - s)
        chosen.append(np.asarray(lp["chosen_logp"])[:keep])
        rejected.append(np.asarray(lp["rejected_logp"])[:keep])
    return {"ref_chosen_logp": np.concatenate(chosen), "ref_rejected_logp": np.concatenate(rejected)}


def fingerprint(tc: TrainConfig, data_sha: str, source: str) -> str:
    """What a checkpoint must match to be resumed from: settings, data and starting model."""
    blob = json.dumps({"format": CHECKPOINT_FORMAT, "settings": tc.to_dict(), "data": data_sha, "model": source},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _manager(path: Path) -> Any:
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
    return ocp.CheckpointManager(path.absolute(), options=options)


def _check_objective(data: Any, tc: TrainConfig) -> None:
    is_pairs = not isinstance(data, Samples)
    if is_pairs != (tc.objective in ("dpo", "orpo")):
        raise HcnrError(f"objective={tc.objective!r} needs "
                        + ("{prompt, chosen, rejected} pairs" if not is_pairs else "{prompt, response} samples"))


def _data_mesh(mesh: Any, batch_size: int) -> jax.sharding.Mesh:
    """``mesh`` as a Mesh (a spec such as ``"data=8"``, or None: every device on ``data``), whose
    ``data`` axis must divide ``batch_size``."""
    if not isinstance(mesh, jax.sharding.Mesh):
        mesh = sharding.make_mesh(mesh)
    if batch_size % mesh.shape[sharding.DATA]:
        raise HcnrError(f"batch_size={batch_size} is not a multiple of the mesh's data axis "
                        f"({mesh.shape[sharding.DATA]} devices)")
    return mesh


def _initial_state(model: Any, tc: TrainConfig, arrays: dict[str, np.ndarray], capacity: int, steps: int,
                   mesh: jax.sharding.Mesh) -> tuple[Params | None, Any, optax.GradientTransformation, Any]:
    """``(frozen, trainable, opt, opt_state)`` placed on ``mesh``: LoRA trains a fresh adapter over
    the frozen model, full fine-tuning the params themselves (frozen None). For DPO, ``arrays``
    gains the starting model's reference log-probabilities."""
    lora = tc.method == "lora"
    frozen = model.params if lora else None
    # Full fine-tuning trains a copy: the step donates its buffers, and the caller's model must survive.
    trainable = (lora_lib.init_adapter(jax.random.key(tc.seed), model.params, model.config, tc.lora_rank,
                                       tc.lora_targets)
                 if lora else jax.tree.map(jnp.copy, model.params))
    if tc.objective == "dpo":
        start_params = lora_lib.merged(frozen, trainable, tc.lora_scaling) if lora else trainable
        arrays.update(reference_logps(start_params, model.config, arrays, tc.batch_size, capacity))
    opt = optimizer(tc, steps)
    opt_state = opt.init(trainable)

    frozen_sh = None if frozen is None else sharding.param_shardings(frozen, mesh)
    train_sh = sharding.param_shardings(trainable, mesh)
    frozen = None if frozen is None else sharding.put_tree(frozen, frozen_sh)
    trainable = sharding.put_tree(trainable, train_sh)
    opt_state = sharding.put_tree(opt_state, sharding.param_shardings(opt_state, mesh))
    return frozen, trainable, opt, opt_state


class _Checkpoints(NamedTuple):
    """Where a resumable run saves: its orbax manager, folder and fingerprint."""

    mngr: Any
    path: Path
    key: str


def _run_steps(step_fn: Callable, arrays: dict[str, np.ndarray], tc: TrainConfig, frozen: Params | None,
               trainable: Any, opt_state: Any, *, mesh: jax.sharding.Mesh, n: int, start: int, steps: int, history: list,
               checkpoints: _Checkpoints | None, progress: bool,
               on_step: Callable[[int, float], None] | None) -> tuple[Any, Any, float]:
    """Optimizer steps ``start .. steps - 1``, each appended to ``history``; saved every
    ``tc.checkpoint_every`` steps and on Ctrl-C (with ``checkpoints``). Returns ``(trainable,
    opt_state, wall seconds)``."""
    from tqdm.auto import tqdm

    per_step = tc.batch_size * tc.grad_accum
    micro_sh = sharding.microbatch_sharding(mesh)
    bar = tqdm(total=steps, initial=start, unit="step", desc=f"train:{tc.objective}", disable=not progress,
               dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    try:  # closed before an error message (Ctrl-C included) is printed below it
        for s in range(start, steps):
            mb = micro_batch(arrays, step_indices(s, n, per_step, tc.seed), tc.grad_accum)
            mb = {k: sharding.put(v, micro_sh(v.ndim)) for k, v in mb.items()}
            trainable, opt_state, loss = step_fn(trainable, opt_state, frozen, mb)
            loss = float(loss)  # waits for the step: the bar and samples/s stay honest
            if not math.isfinite(loss):
                raise HcnrError(f"training diverged: loss {loss} at step {s + 1} (lower learning_rate?)")
            seen += per_step
            rate = seen / (time.perf_counter() - t0)
            history.append(dict(step=s + 1, loss=round(loss, 6), samples_per_s=round(rate, 3)))
            bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.2f}")
            bar.update(1)
            if checkpoints is not None and (s + 1) % tc.checkpoint_every == 0 and s + 1 < steps:
                _save(checkpoints.mngr, checkpoints.path, s + 1, checkpoints.key, history, trainable, opt_state)
            if on_step is not None:
                on_step(s + 1, loss)
            if s + 1 < steps:
                save = None if checkpoints is None else functools.partial(
                    _save_now, checkpoints.mngr, checkpoints.path, s + 1, checkpoints.key, history, trainable, opt_state)
                interrupt.check(save=save, where=f"train: after step {s + 1} of {steps}")
    finally:
        bar.close()
    return trainable, opt_state, time.perf_counter() - t0


def train(model: Any, data: Any, tc: TrainConfig, *, checkpoint_dir: str | Path | None = None,
          mesh: Any = None, progress: bool = True, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train ``model`` (a ``Pretrained``) on ``data`` (``Samples`` for sft, ``PairSamples`` for
    dpo/orpo) with ``tc``. ``checkpoint_dir``: save every ``tc.checkpoint_every`` steps and resume
    from the latest save there. ``mesh``: a Mesh or spec (``"data=8"``; default every device on
    ``data``): micro-batches split over ``data``. ``on_step(step, loss)`` after each step."""
    _check_objective(data, tc)
    arrays = data_arrays(data)
    n = len(data)
    steps = num_steps(tc, n)
    capacity = max(target_capacity(v) for k, v in arrays.items() if k.endswith("loss_mask"))
    mesh = _data_mesh(mesh, tc.batch_size)
    frozen, trainable, opt, opt_state = _initial_state(model, tc, arrays, capacity, steps, mesh)

    start, history, checkpoints = 0, [], None
    key = fingerprint(tc, data.sha256, model.source)
    if checkpoint_dir is not None and tc.checkpoint_every > 0:
        start, history, trainable, opt_state, mngr = _resume(Path(checkpoint_dir), key, trainable, opt_state)
        checkpoints = _Checkpoints(mngr, Path(checkpoint_dir), key)
    trainable, opt_state, wall = _run_steps(make_step(model.config, tc, opt, capacity), arrays, tc, frozen, trainable,
                                            opt_state, mesh=mesh, n=n, start=start, steps=steps, history=history,
                                            checkpoints=checkpoints, progress=progress, on_step=on_step)
    if checkpoints is not None:
        checkpoints.mngr.close()
    host = sharding.tree_to_host(trainable)
    lora = tc.method == "lora"
    params = lora_lib.merged(model.params, host, tc.lora_scaling) if lora else host
    per_step = tc.batch_size * tc.grad_accum
    report = dict(settings=tc.to_dict(), samples=n, data_sha256=data.sha256, steps=steps, resumed_from=start,
                  samples_seen=steps * per_step, wall_s=round(wall, 2), samples_per_s=history[-1]["samples_per_s"]
                  if history else None, target_capacity=capacity, devices=int(mesh.size),
                  trainable_params=lora_lib.num_params(host) if lora else sum(int(x.size) for x in jax.tree.leaves(host)),
                  final_loss=history[-1]["loss"] if history else None)
    return TrainResult(host, params, history, report)


def _resume(path: Path, key: str, trainable: Any, opt_state: Any) -> tuple:
    import orbax.checkpoint as ocp

    meta_path = path / "train_state.json"
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") != key:
            raise HcnrError(f"{path}: holds checkpoints of a run with other settings, data or model; "
                            "use another checkpoint folder or remove it")
    mngr = _manager(path)
    latest = mngr.latest_step()
    if latest is None or not meta_path.exists():
        return 0, [], trainable, opt_state, mngr
    state = {"trainable": trainable, "opt_state": opt_state}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
    history = [h for h in json.loads(meta_path.read_text())["history"] if h["step"] <= latest]
    log.info("train: resumed from %s at step %d", path, latest)
    return int(latest), history, restored["trainable"], restored["opt_state"], mngr


def _save(mngr: Any, path: Path, step: int, key: str, history: list, trainable: Any, opt_state: Any) -> None:
    import orbax.checkpoint as ocp

    mngr.save(step, args=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}))
    mngr.wait_until_finished()
    # Written after the checkpoint: the history never runs ahead of the weights it describes.
    atomic_write_text(path / "train_state.json", json.dumps({"fingerprint": key, "history": history}))


def _save_now(mngr: Any, path: Path, step: int, key: str, history: list, trainable: Any, opt_state: Any) -> str:
    if mngr.latest_step() != step:
        _save(mngr, path, step, key, history, trainable, opt_state)
    return f"progress saved in {path}; rerun the same command to resume"


def load_training_data(path: str | Path, model: Any, tc: TrainConfig) -> Any:
    """The JSONL file for ``tc.objective``: ``Samples`` (sft) or ``PairSamples`` (dpo/orpo)."""
    from hcnr_jax.data import samples as data_lib

    vocab = model.config.vocab_size
    if tc.objective == "sft":
        return data_lib.load_samples(path, model.tokenizer, tc.max_length, tc.limit, vocab_size=vocab)
    return data_lib.load_pairs(path, model.tokenizer, tc.max_length, tc.limit)
