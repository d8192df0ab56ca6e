"""Per-neuron Fisher information (docs/method.md, Stage 1): ``s_jk = E_n ||dL_n / dW_j[:, k]||^2``.

``L_n`` is sample n's mean cross-entropy over its loss-masked tokens. One backward pass of
``sum_n L_n`` gives, at every linear layer, each token's output gradient ``g[n, t]`` belonging to
sample n alone (samples do not interact), and the forward pass captures the layer's input
``x[n, t]``. The per-sample weight gradient is ``g[n]^T x[n]``; its per-neuron squared norms come
from ``kernels.fisher_norms`` without forming it (ghost norms). The backward pass is taken with
respect to zero "probes" added to the linear outputs, not the weights, so no weight gradient is
ever computed, per sample or batched.

The LM head (``V`` logits per position, forward and backward) is applied only where there are
targets: each row's target-predicting hidden states are gathered into ``max_targets`` slots (a
capacity fixed for the whole run, so one compilation), which in SFT data, where only the
response tokens are targets, skips most of that work. Empty slots contribute exactly 0.

Every matmul runs at ``precision=HIGHEST`` (the model's einsums through ``forward(precision=)``,
the LM head, the ghost norms): exact float32 on every backend, never TF32.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hcnr_jax.config import ModelConfig
from hcnr_jax.kernels.fisher_norms import AXES, HIGHEST, neuron_sq_norms
from hcnr_jax.model import forward, lm_head
from hcnr_jax.params import Params, get, linear_names

Batch = Mapping[str, jax.Array]  # input_ids [B, T] int32, attention_mask [B, T] bool, loss_mask [B, T] bool


def _mean_nll(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """logits [B, S, V], labels [B, S], mask [B, S] bool -> [B]: mean NLL over the masked slots (0
    where none). Unmasked slots contribute exactly 0, value and gradient."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    mask = mask.astype(bool)
    count = jnp.sum(mask.astype(jnp.float32), axis=1)
    return jnp.sum(jnp.where(mask, nll, 0.0), axis=1) / jnp.maximum(count, 1.0)


def per_sample_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """logits [B, T, V] -> [B]: mean CE of each sample over its targets (``loss_mask[:, t]``: token t
    is predicted from logits at t - 1). A sample without targets has loss 0."""
    return _mean_nll(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:])


def target_capacity(loss_mask: np.ndarray, multiple: int = 16) -> int:
    """Host-side ``max_targets`` for ``update`` (the capacity of ``gathered_loss``): the most
    targets of any row of ``loss_mask [N, T]`` (a whole data set, so that every batch of a run
    shares it), rounded up to ``multiple`` and capped at T - 1 (the positions that predict a token)."""
    lm = np.asarray(loss_mask, bool)
    most = int(lm[:, 1:].sum(axis=1).max(initial=0))
    return min(-(-most // multiple) * multiple, max(lm.shape[1] - 1, 0))


def gathered_loss(params: Params, cfg: ModelConfig, hidden: jax.Array, input_ids: jax.Array,
                  loss_mask: jax.Array, capacity: int, precision: jax.lax.Precision | None = None) -> jax.Array:
    """``per_sample_loss(lm_head(params, cfg, hidden), input_ids, loss_mask)`` with the LM head
    applied only at the target-predicting positions: hidden [B, T, D] (final-norm) -> [B].

    Each row's positions t - 1 with ``loss_mask[:, t]`` are gathered, in order, into ``capacity``
    slots (static; at least the row's number of targets, e.g. ``target_capacity`` of the data set,
    else the excess targets are dropped); unused slots are masked out and contribute exactly 0.
    ``precision``: of the LM head's matmul (None: XLA's default)."""
    h, labels, valid = gather_targets(hidden, input_ids, loss_mask, capacity)
    return _mean_nll(lm_head(params, cfg, h, precision), labels, valid)


def gather_targets(hidden: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                   capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each row's target-predicting hidden states, in order, in ``capacity`` slots: hidden
    [B, T, D] -> (h [B, K, D], labels [B, K], valid [B, K] bool). ``loss_mask[:, t]`` marks token t
    as a target predicted at position t - 1; slots past a row's targets are not ``valid``."""
    mask = loss_mask[:, 1:].astype(bool)  # [B, T-1]: position t predicts target t + 1
    # Stable sort of "not a target": the target positions first, in order, then the others.
    pos = jnp.argsort(jnp.logical_not(mask).astype(jnp.int32), axis=1, stable=True)[:, :capacity]
    h = jnp.take_along_axis(hidden[:, :-1], pos[..., None], axis=1)
    labels = jnp.take_along_axis(input_ids[:, 1:], pos, axis=1)
    return h, labels, jnp.take_along_axis(mask, pos, axis=1)


def num_neurons(params: Params, name: str, neuron_axis: str) -> int:
    out, inp = get(params, name).shape
    return inp if neuron_axis == "input" else out


def init(params: Params, cfg: ModelConfig, neuron_axis: str = "input") -> dict[str, jax.Array]:
    """Zero accumulators: HF weight name -> float32 [n_neurons]."""
    if neuron_axis not in AXES:
        raise ValueError(f"neuron_axis must be one of {AXES}, got {neuron_axis!r}")
    return {n: jnp.zeros((num_neurons(params, n, neuron_axis),), jnp.float32) for n in linear_names(cfg)}


def output_gradients(params: Params, cfg: ModelConfig, batch: Batch,
                     max_targets: int | None = None) -> tuple[dict, dict]:
    """(layer output gradients ``[B, T, out]`` of ``sum_n L_n``, layer inputs ``[B, T, in]``), both
    keyed by HF weight name. ``max_targets``: LM head capacity per row (``gathered_loss``; at
    least the most targets of any row); None: T - 1, every position."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    act = params["model"]["embed_tokens"]["weight"].dtype
    probes = {n: jnp.zeros((*ids.shape, get(params, n).shape[0]), act) for n in linear_names(cfg)}
    capacity = ids.shape[1] - 1 if max_targets is None else max_targets

    def loss(probes):
        out = forward(params, cfg, ids, attn, probes=probes, capture=True, return_logits=False, precision=HIGHEST)
        loss = gathered_loss(params, cfg, out.hidden, ids, batch["loss_mask"], capacity, precision=HIGHEST)
        return jnp.sum(loss), out.inputs

    grads, inputs = jax.grad(loss, has_aux=True)(probes)
    return grads, inputs


def update(state: dict[str, jax.Array], params: Params, batch: Batch, *, cfg: ModelConfig,
           neuron_axis: str = "input", backend: str = "auto", max_targets: int | None = None
           ) -> dict[str, jax.Array]:
    """Add the batch's per-sample per-neuron squared gradient norms, summed over samples, to
    ``state``. Pure; jit it with ``cfg``, ``neuron_axis``, ``backend`` and ``max_targets`` (see
    ``output_gradients``) static."""
    grads, inputs = output_gradients(params, cfg, batch, max_targets)
    keep = batch["attention_mask"][..., None]
    new = {}
    for name, acc in state.items():
        g = jnp.where(keep, grads[name].astype(jnp.float32), 0.0)  # padding carries no gradient anyway
        norms = neuron_sq_norms(g, inputs[name], neuron_axis, backend)  # [B, n]
        new[name] = acc + jnp.sum(norms, axis=0)
    return new
