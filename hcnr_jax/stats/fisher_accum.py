"""Per-neuron Fisher information (METHOD.md, Stage 1): ``s_jk = E_n ||dL_n / dW_j[:, k]||^2``.

``L_n`` is sample n's mean cross-entropy over its loss-masked tokens. One backward pass of
``sum_n L_n`` gives, at every linear layer, each token's output gradient ``g[n, t]`` belonging to
sample n alone (samples do not interact), and the forward pass captures the layer's input
``x[n, t]``. The per-sample weight gradient is ``g[n]^T x[n]``; its per-neuron squared norms come
from ``kernels.fisher_norms`` without forming it (ghost norms). The backward pass is taken with
respect to zero "probes" added to the linear outputs, not the weights, so no weight gradient is
ever computed, per sample or batched.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from hcnr_jax.config import ModelConfig
from hcnr_jax.kernels.fisher_norms import AXES, neuron_sq_norms
from hcnr_jax.model import forward
from hcnr_jax.params import Params, get, linear_names

Batch = Mapping[str, jax.Array]  # input_ids [B, T] int32, attention_mask [B, T] bool, loss_mask [B, T] bool


def per_sample_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """logits [B, T, V] -> [B]: mean CE of each sample over its targets (``loss_mask[:, t]``: token t
    is predicted from logits at t - 1). A sample without targets has loss 0."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def num_neurons(params: Params, name: str, neuron_axis: str) -> int:
    out, inp = get(params, name).shape
    return inp if neuron_axis == "input" else out


def init(params: Params, cfg: ModelConfig, neuron_axis: str = "input") -> dict[str, jax.Array]:
    """Zero accumulators: HF weight name -> float32 [n_neurons]."""
    if neuron_axis not in AXES:
        raise ValueError(f"neuron_axis must be one of {AXES}, got {neuron_axis!r}")
    return {n: jnp.zeros((num_neurons(params, n, neuron_axis),), jnp.float32) for n in linear_names(cfg)}


def output_gradients(params: Params, cfg: ModelConfig, batch: Batch) -> tuple[dict, dict]:
    """(layer output gradients ``[B, T, out]`` of ``sum_n L_n``, layer inputs ``[B, T, in]``), both
    keyed by HF weight name."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    act = params["model"]["embed_tokens"]["weight"].dtype
    probes = {n: jnp.zeros((*ids.shape, get(params, n).shape[0]), act) for n in linear_names(cfg)}

    def loss(probes):
        out = forward(params, cfg, ids, attn, probes=probes, capture=True)
        return jnp.sum(per_sample_loss(out.logits, ids, batch["loss_mask"])), out.inputs

    grads, inputs = jax.grad(loss, has_aux=True)(probes)
    return grads, inputs


def update(state: dict[str, jax.Array], params: Params, batch: Batch, *, cfg: ModelConfig,
           neuron_axis: str = "input", backend: str = "auto") -> dict[str, jax.Array]:
    """Add the batch's per-sample per-neuron squared gradient norms, summed over samples, to
    ``state``. Pure; jit it with ``cfg``, ``neuron_axis`` and ``backend`` static."""
    grads, inputs = output_gradients(params, cfg, batch)
    keep = batch["attention_mask"][..., None]
    new = {}
    for name, acc in state.items():
        g = jnp.where(keep, grads[name].astype(jnp.float32), 0.0)  # padding carries no gradient anyway
        norms = neuron_sq_norms(g, inputs[name], neuron_axis, backend)  # [B, n]
        new[name] = acc + jnp.sum(norms, axis=0)
    return new
