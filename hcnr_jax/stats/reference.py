"""Slow, obviously-correct versions of the statistics, for tests and benchmarks only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hcnr_jax.config import ModelConfig
from hcnr_jax.data.samples import Samples
from hcnr_jax.model import forward
from hcnr_jax.params import Params, get, linear_names
from hcnr_jax.precision import HIGHEST
from hcnr_jax.stats.fisher_accum import per_sample_loss


def sample_loss(params: Params, cfg: ModelConfig, ids: jax.Array, attn: jax.Array, lm: jax.Array) -> jax.Array:
    """Scalar loss of one sample (``ids [T]``)."""
    logits = forward(params, cfg, ids[None], attn[None], precision=HIGHEST).logits
    return per_sample_loss(logits, ids[None], lm[None])[0]


def fisher_vmap(params: Params, cfg: ModelConfig, samples: Samples, neuron_axis: str = "input",
                batch_size: int = 8) -> dict[str, np.ndarray]:
    """Fisher from ``vmap(grad)``: full per-sample gradients of the linear weights, squared, reduced."""
    names = linear_names(cfg)
    linears = {n: get(params, n) for n in names}

    def loss(lin, ids, attn, lm):
        from hcnr_jax.params import set_leaves

        return sample_loss(set_leaves(params, lin), cfg, ids, attn, lm)

    @jax.jit
    def batch_sums(ids, attn, lm):
        grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0))(linears, ids, attn, lm)
        return {n: jnp.sum(jnp.sum(g.astype(jnp.float32) ** 2, axis=2 if neuron_axis == "output" else 1), axis=0)
                for n, g in grads.items()}

    total = {n: 0.0 for n in names}
    for s in range(0, len(samples), batch_size):
        part = batch_sums(samples.input_ids[s:s + batch_size], samples.attention_mask[s:s + batch_size],
                          samples.loss_mask[s:s + batch_size])
        total = {n: total[n] + np.asarray(part[n], np.float64) for n in names}
    return {n: (v / len(samples)).astype(np.float32) for n, v in total.items()}
