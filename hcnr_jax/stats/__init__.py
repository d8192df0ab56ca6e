"""The two statistics HCNR needs, as functions of (params, samples).

- ``fisher``: per-neuron Fisher importance of every linear weight of the transformer blocks, the
  mean over samples of per-sample squared gradient norms (never a squared batch gradient).
- ``hessian``: ``sum X^T X`` of each linear layer's input over the non-padding tokens.

Both accumulate over batches with a jitted pure ``update`` (``stats.fisher_update``,
``stats.hessian_update``), sharded over a mesh (``hcnr_jax.sharding``), with optional orbax
checkpoints and a result cache (``cache_dir``). Common keyword options:

- ``mesh``: Mesh, ``"data=2,model=4"`` or None (all devices on ``data``); ``fsdp``: also split
  weights over ``data``.
- ``backend``: "auto" (a Pallas kernel only on a platform where it has been checked against its
  reference, ``hcnr_jax.kernels.fisher_norms.VERIFIED``; jax.numpy elsewhere), "pallas" or
  "reference".
- ``cache_dir``: reuse results for identical weights, data and settings; checkpoints go there too
  (every ``checkpoint_every`` batches, default 16) so that a killed run resumes. Each entry is
  computed under a lock: another run needing it waits up to ``lock_timeout`` seconds (default
  ``hcnr_jax.io.LOCK_TIMEOUT_S``). Damaged entries and checkpoints are set aside and recomputed.
- ``progress``: show a progress bar (samples/s); ``on_batch``: callback after each batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import numpy as np

from hcnr_jax.config import ModelConfig
from hcnr_jax.data import Samples
from hcnr_jax.params import Params
from hcnr_jax.stats import engine
from hcnr_jax.stats import fisher_accum as _fisher
from hcnr_jax.stats import hessian_accum as _hessian
from hcnr_jax.stats.fisher_accum import per_sample_loss
from hcnr_jax.stats.fisher_accum import update as fisher_update
from hcnr_jax.stats.hessian_accum import update as hessian_update

__all__ = ["fisher", "fisher_update", "hessian", "hessian_update", "per_sample_loss"]


def _run(kind: str, init: Any, update: Any, params: Params, cfg: ModelConfig, samples: Samples,
         batch_size: int, settings: dict[str, Any], opts: dict[str, Any], *, cache_dir: Any = None,
         checkpoint_every: int = 16, checkpoint_dir: Any = None, lock_timeout: float | None = None,
         **run_opts: Any) -> dict[str, np.ndarray]:
    if checkpoint_dir is not None:
        return engine.accumulate(init, update, params, cfg, samples, batch_size=batch_size, opts=opts,
                                 checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, desc=kind,
                                 **run_opts)

    def compute(ckpt: Any) -> dict[str, np.ndarray]:
        return engine.accumulate(init, update, params, cfg, samples, batch_size=batch_size, opts=opts,
                                 checkpoint_dir=ckpt, checkpoint_every=checkpoint_every, desc=kind, **run_opts)

    expected = None
    if cache_dir is not None:
        import jax

        expected = {k: tuple(v.shape) for k, v in jax.eval_shape(init, params).items()}
    return engine.cached(kind, {"batch_size": batch_size, **settings}, params, samples, cache_dir, compute,
                         expected=expected, lock_timeout=lock_timeout)


def fisher(params: Params, cfg: ModelConfig, samples: Samples, *, neuron_axis: str = "input",
           batch_size: int = 8, backend: str = "auto", remat: bool | str = "auto", **opts: Any
           ) -> dict[str, np.ndarray]:
    """HF linear weight name -> float32 ``[n_neurons]``: the mean over samples of the per-sample
    squared gradient norm of each neuron (column ``W[:, k]`` for "input", row ``W[k, :]`` for
    "output"); a sample's loss is its mean CE over its loss-masked tokens. ``remat``: recompute
    blocks in the backward pass (``fisher_accum.update``); "auto": on accelerators, not on a CPU.
    Options: module doc."""
    init = partial(_fisher.init, cfg=cfg, neuron_axis=neuron_axis)
    # The LM head runs only at target positions, in a capacity fixed by the whole data set (one
    # compilation for every batch).
    capacity = _fisher.target_capacity(samples.loss_mask)
    if remat == "auto":
        # Blocks are recomputed where device memory binds (accelerators), not on a CPU, where the
        # host's memory rarely does and the extra forward pass costs a third of the step.
        import jax

        remat = jax.default_backend() != "cpu"
    sums = _run("fisher", init, fisher_update, params, cfg, samples, batch_size,
                {"neuron_axis": neuron_axis},
                {"neuron_axis": neuron_axis, "backend": backend, "max_targets": capacity, "remat": bool(remat)},
                **opts)
    return {k: (v / np.float32(len(samples))).astype(np.float32) for k, v in sums.items()}


def hessian(params: Params, cfg: ModelConfig, samples: Samples, *, batch_size: int = 8,
            backend: str = "auto", layers: Iterable[str] | None = None, **opts: Any) -> dict[str, np.ndarray]:
    """HF linear weight name -> float32 ``[in, in]``: the sum over non-padding tokens of ``x x^T`` of
    that layer's input (q/k/v share one array object, gate/up another). ``layers``: only these
    weight names (default: all; a Llama-8B's 32 down_proj Hessians alone are 26 GB in float32).
    Options: module doc."""
    wanted = None if layers is None else sorted({_hessian.owner(n) for n in layers})
    init = partial(_hessian.init, cfg=cfg, owners=None if wanted is None else tuple(wanted))
    settings = {} if wanted is None else {"layers": wanted}
    sums = _run("hessian", init, hessian_update, params, cfg, samples, batch_size, settings,
                {"backend": backend}, **opts)
    out = _hessian.expand(sums, cfg)
    return out if layers is None else {n: out[n] for n in layers}
