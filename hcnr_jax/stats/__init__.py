"""The two statistics HCNR needs, as functions of (params, samples).

- ``fisher``: per-neuron Fisher importance of every linear weight of the transformer blocks, the
  mean over samples of per-sample squared gradient norms (never a squared batch gradient).
- ``hessian``: ``sum X^T X`` of each linear layer's input over the non-padding tokens.

Both accumulate over batches with a jitted pure ``update`` (``stats.fisher_update``,
``stats.hessian_update``), sharded over a mesh (``hcnr_jax.sharding``), with optional orbax
checkpoints and a result folder (``cache_dir``). How they run (batch size, mesh, kernels, remat,
result folder, progress) is one `StatsOptions` value; what they compute (``neuron_axis``, the
Hessian's ``layers``) are their own arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

import numpy as np

from hcnr_jax.config import ModelConfig
from hcnr_jax.data.samples import Samples
from hcnr_jax.params import Params
from hcnr_jax.stats import engine
from hcnr_jax.stats import fisher_accum as _fisher
from hcnr_jax.stats import hessian_accum as _hessian
from hcnr_jax.stats.fisher_accum import per_sample_loss
from hcnr_jax.stats.fisher_accum import update as fisher_update
from hcnr_jax.stats.hessian_accum import update as hessian_update
from hcnr_jax.stats.options import StatsOptions

__all__ = ["StatsOptions", "fisher", "fisher_static", "fisher_update", "hessian", "hessian_static", "hessian_update",
           "per_sample_loss"]


def _run(kind: str, init: Any, update: Any, params: Params, cfg: ModelConfig, samples: Samples,
         identity: Mapping[str, Any], static: Mapping[str, Any], options: StatsOptions) -> dict[str, np.ndarray]:
    """Accumulate ``update`` over ``samples``, through the result folder when ``options.cache_dir``
    is set (``identity``: the settings that make the result what it is, part of its key)."""
    def compute(checkpoint_dir: Any) -> dict[str, np.ndarray]:
        return engine.accumulate(init, update, params, cfg, samples, static, options,
                                 checkpoint_dir=checkpoint_dir, desc=kind)

    if options.cache_dir is None:
        return compute(None)
    import jax

    expected = {k: tuple(v.shape) for k, v in jax.eval_shape(init, params).items()}
    # The key's settings are the batch size and ``identity`` only, as ever: entries written before
    # StatsOptions existed are still found.
    return engine.stored_or_computed(kind, {"batch_size": options.batch_size, **identity}, params, samples,
                                     options.cache_dir, compute, expected=expected,
                                     lock_timeout=options.lock_timeout)


def fisher_static(options: StatsOptions, neuron_axis: str, max_targets: int | None) -> dict[str, Any]:
    """The static keyword arguments of `fisher_update` under ``options`` (one compiled step per
    distinct set): ``hcnr_jax.plan`` compiles the very step ``fisher`` runs from these."""
    return {"neuron_axis": neuron_axis, "backend": options.backend, "max_targets": max_targets,
            "remat": options.remat, "lm_chunk": options.lm_chunk}


def hessian_static(options: StatsOptions) -> dict[str, Any]:
    """The static keyword arguments of `hessian_update` under ``options``."""
    return {"backend": options.backend}


def fisher(params: Params, cfg: ModelConfig, samples: Samples, options: StatsOptions | None = None, *,
           neuron_axis: str = "input") -> dict[str, np.ndarray]:
    """HF linear weight name -> float32 ``[n_neurons]``: the mean over samples of the per-sample
    squared gradient norm of each neuron (column ``W[:, k]`` for "input", row ``W[k, :]`` for
    "output"); a sample's loss is its mean CE over its loss-masked tokens. ``options``: how it runs
    (`StatsOptions`; default ``StatsOptions()``)."""
    options = options or StatsOptions()
    init = partial(_fisher.init, cfg=cfg, neuron_axis=neuron_axis)
    # The LM head runs only at target positions, in a capacity fixed by the whole data set (one
    # compilation for every batch).
    static = fisher_static(options, neuron_axis, _fisher.target_capacity(samples.loss_mask))
    sums = _run("fisher", init, fisher_update, params, cfg, samples, {"neuron_axis": neuron_axis}, static, options)
    return {k: (v / np.float32(len(samples))).astype(np.float32) for k, v in sums.items()}


def hessian(params: Params, cfg: ModelConfig, samples: Samples, options: StatsOptions | None = None, *,
            layers: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """HF linear weight name -> float32 ``[in, in]``: the sum over non-padding tokens of ``x x^T`` of
    that layer's input (q/k/v share one array object, gate/up another). ``layers``: only these
    weight names (default: all; a Llama-8B's 32 down_proj Hessians alone are 26 GB in float32).
    ``options``: how it runs (`StatsOptions`)."""
    options = options or StatsOptions()
    wanted = None if layers is None else sorted({_hessian.owner(n) for n in layers})
    init = partial(_hessian.init, cfg=cfg, owners=None if wanted is None else tuple(wanted))
    identity = {} if wanted is None else {"layers": wanted}
    sums = _run("hessian", init, hessian_update, params, cfg, samples, identity, hessian_static(options), options)
    out = _hessian.expand(sums, cfg)
    return out if layers is None else {n: out[n] for n in layers}
