"""Per-neuron Fisher information (docs/method.md, Stage 1): ``s_jk = E_n ||dL_n / dW_j[:, k]||^2``.

``L_n`` is sample n's mean cross-entropy over its loss-masked tokens. One backward pass of
``sum_n L_n`` gives, at every linear layer, each token's output gradient ``g[n, t]`` belonging to
sample n alone (samples do not interact); with the layer's input ``x[n, t]`` the per-sample weight
gradient is ``g[n]^T x[n]``, whose per-neuron squared norms ``kernels.fisher_norms`` takes without
forming it (ghost norms).

The norms are reduced *inside* the backward pass, in one layer's memory: every linear runs as
``norms_linear``, a ``jax.custom_vjp`` whose backward takes ``g`` and ``x`` of that layer alone,
returns the input gradient ``g W`` and, as the "gradient" of a zero ``tap [n_neurons]`` input,
the batch's summed per-neuron norms; ``update`` differentiates with respect to the taps only, so
no weight gradient is computed and no layer's ``g`` or ``x`` outlives its own backward step.
Blocks are rematerialised (``forward(remat=True)``): the backward pass recomputes one block's
activations from its input, so a few blocks' activations are live, not every block's. The LM head
runs over its target slots in chunks (``chunked_loss``), each chunk's hidden-state gradient taken
in the forward pass while its logits exist, so its ``[B, K, V]`` logits are never live at once
and never recomputed.

The LM head (``V`` logits per position, forward and backward) is applied only where there are
targets: each row's target-predicting hidden states are gathered into ``max_targets`` slots (a
capacity fixed for the whole run, so one compilation), which in SFT data, where only the
response tokens are targets, skips most of that work. Empty slots contribute exactly 0.

Every matmul runs at ``precision=HIGHEST`` (the model's einsums through ``forward(precision=)``,
the LM head, the ghost norms): exact float32 on every backend, never TF32.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hcnr_jax.config import ModelConfig
from hcnr_jax.kernels.fisher_norms import AXES, neuron_sq_norms
from hcnr_jax.model import after, forward, head_logits, head_weight, lm_head
from hcnr_jax.params import Params, get, linear_names
from hcnr_jax.precision import HIGHEST

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


# Target slots of the LM head per chunk: a chunk's logits are [B, LM_CHUNK, V] float32, a few such
# arrays live while it runs (Llama-3's 128k vocabulary at batch 8: 0.13 GB each; SmolLM2's 49k:
# 0.05 GB each). Smaller chunks cost nothing but smaller matmuls.
LM_CHUNK = 32


def chunked_loss(params: Params, cfg: ModelConfig, hidden: jax.Array, input_ids: jax.Array,
                 loss_mask: jax.Array, capacity: int, chunk: int = LM_CHUNK,
                 precision: jax.lax.Precision | None = None) -> jax.Array:
    """``gathered_loss`` with the LM head over ``chunk`` target slots at a time: hidden [B, T, D]
    -> [B], the same loss up to float32 summation order. Its gradient flows to ``hidden`` only (the
    LM head's weight is a constant here: the Fisher differentiates its taps). Each chunk's gradient
    with respect to its hidden states is taken in the forward pass (``_head_nll``), while its
    logits are live, so only one chunk's ``[B, chunk, V]`` arrays exist at a time and nothing is
    recomputed in the backward pass."""
    h, labels, valid = gather_targets(hidden, input_ids, loss_mask, capacity)
    b, k, _ = h.shape
    n = max(-(-k // chunk), 1)
    pad = n * chunk - k  # padded slots are not valid: they add exactly 0

    def split(a: jax.Array) -> jax.Array:  # [B, K, ...] -> [n, B, chunk, ...]
        a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)

    # The weight goes in as stored. A float32 copy of a bfloat16 head made here, for both of a
    # chunk's matmuls, saves one of the CPU compiler's own copies on one device (Llama-3.1-8B: XLA's
    # CPU peak 20.69 -> 19.72 GiB) but, with the head split over `model` (70B on model=8), made it
    # keep every block's input in float32 (22.9 -> 27.8 GiB per device): an accelerator makes neither.
    w = jax.lax.stop_gradient(head_weight(params, cfg))
    total, _ = jax.lax.scan(lambda acc, xs: (acc + _head_nll(cfg, precision, w, *xs), None),
                            jnp.zeros((b,), jnp.float32), (split(h), split(labels), split(valid)))
    count = jnp.sum(valid.astype(jnp.float32), axis=1)
    return total / jnp.maximum(count, 1.0)


def _head_nll_value(cfg: ModelConfig, precision: jax.lax.Precision | None, w: jax.Array, h: jax.Array,
                    labels: jax.Array, valid: jax.Array) -> jax.Array:
    """Summed NLL of each row's valid slots: h [B, C, D], labels [B, C], valid [B, C] -> [B]."""
    logp = jax.nn.log_softmax(head_logits(w, cfg, h, precision), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0), axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _head_nll(cfg: ModelConfig, precision: jax.lax.Precision | None, w: jax.Array, h: jax.Array,
              labels: jax.Array, valid: jax.Array) -> jax.Array:
    """``_head_nll_value`` whose backward reuses the Jacobian taken in the forward pass. Row b's
    value depends on ``h[b]`` alone, so the gradient for a cotangent ``g [B]`` is ``g[b]`` times the
    gradient of row b's value: one vector-Jacobian product with ones, in the forward pass."""
    return _head_nll_value(cfg, precision, w, h, labels, valid)


def _head_nll_fwd(cfg, precision, w, h, labels, valid):
    value, vjp = jax.vjp(lambda h: _head_nll_value(cfg, precision, w, h, labels, valid), h)
    (dh,) = vjp(jnp.ones_like(value))
    return value, dh  # the residual: [B, C, D], the size of the chunk's hidden states


def _head_nll_bwd(cfg, precision, dh, g):
    # w is a constant (stop_gradient in chunked_loss); labels and valid are not differentiable.
    return None, (g[:, None, None] * dh).astype(dh.dtype), None, None


_head_nll.defvjp(_head_nll_fwd, _head_nll_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def norms_linear(axis: str, backend: str, x: jax.Array, w: jax.Array, tap: jax.Array) -> jax.Array:
    """``x [B, T, in] @ w[out, in]^T`` at HIGHEST precision; ``tap [n]`` (zeros) is not used in the
    value. Backward: the input gradient, no weight gradient, and as ``tap``'s gradient the
    per-neuron squared norms of the per-sample weight gradients summed over the batch (float32
    ``[in]`` for axis "input", ``[out]`` for "output")."""
    del axis, backend, tap
    return jnp.einsum("bti,oi->bto", x, w, precision=HIGHEST)


def _norms_linear_fwd(axis, backend, x, w, tap):
    return norms_linear(axis, backend, x, w, tap), (x, w)


def _norms_linear_bwd(axis, backend, res, g):
    x, w = res
    gx = jnp.einsum("bto,oi->bti", g, w, precision=HIGHEST).astype(x.dtype)
    # Padding tokens carry exactly zero output gradient (no loss reaches them), so no mask is needed.
    norms = jnp.sum(neuron_sq_norms(g, x, axis, backend), axis=0)
    # The norms are only needed at the very end: a scheduler may defer them and keep every layer's
    # g and x live until then (XLA's CPU scheduler did: 0.24 GiB per Llama-70B block on model=8).
    # The input gradient depends on the norms (model.after), so the layers below wait for them.
    gx = after(gx, norms)
    # The weight is not differentiated (update takes the gradient with respect to the taps only):
    # its zero cotangent is never used and XLA removes it.
    return gx, jnp.zeros_like(w), norms


norms_linear.defvjp(_norms_linear_fwd, _norms_linear_bwd)


def norms_and_loss(params: Params, cfg: ModelConfig, batch: Batch, *, neuron_axis: str = "input",
                   backend: str = "auto", max_targets: int | None = None, lm_chunk: int = LM_CHUNK,
                   remat: bool = True) -> tuple[dict[str, jax.Array], jax.Array]:
    """(HF weight name -> float32 ``[n_neurons]``: the batch's per-sample per-neuron squared weight
    gradient norms summed over samples, per-sample losses ``[B]``), from one remat'd forward and
    backward pass with the norms reduced layer by layer (module doc)."""
    ids = batch["input_ids"]
    capacity = ids.shape[1] - 1 if max_targets is None else max_targets
    taps = {n: jnp.zeros((num_neurons(params, n, neuron_axis),), jnp.float32) for n in linear_names(cfg)}

    def loss(taps):
        def linear(p, x, name):
            y = norms_linear(neuron_axis, backend, x, p["weight"], taps[name])
            return y + p["bias"] if "bias" in p else y

        out = forward(params, cfg, ids, batch["attention_mask"], return_logits=False, precision=HIGHEST,
                      linear=linear, remat=remat)
        per = chunked_loss(params, cfg, out.hidden, ids, batch["loss_mask"], capacity, lm_chunk, HIGHEST)
        return jnp.sum(per), per

    norms, per = jax.grad(loss, has_aux=True)(taps)
    return norms, per


def update(state: dict[str, jax.Array], params: Params, batch: Batch, *, cfg: ModelConfig,
           neuron_axis: str = "input", backend: str = "auto", max_targets: int | None = None,
           remat: bool = True, lm_chunk: int = LM_CHUNK) -> dict[str, jax.Array]:
    """Add the batch's per-sample per-neuron squared gradient norms, summed over samples, to
    ``state`` (name -> float32 ``[n_neurons]``). Pure; jit it with ``cfg``, ``neuron_axis``,
    ``backend``, ``max_targets`` (the LM head's target slots per row, at least the most targets of
    any row; None: T - 1), ``remat`` (recompute blocks in the backward pass: one block's
    activations live instead of all, for one more forward pass) and ``lm_chunk`` (target slots of
    the LM head at a time) static."""
    if neuron_axis not in AXES:
        raise ValueError(f"neuron_axis must be one of {AXES}, got {neuron_axis!r}")
    norms, _ = norms_and_loss(params, cfg, batch, neuron_axis=neuron_axis, backend=backend, max_targets=max_targets,
                              lm_chunk=lm_chunk, remat=remat)
    return {name: acc + norms[name] for name, acc in state.items()}


def update_unfused(state: dict[str, jax.Array], params: Params, batch: Batch, *, cfg: ModelConfig,
                   neuron_axis: str = "input", backend: str = "auto", max_targets: int | None = None
                   ) -> dict[str, jax.Array]:
    """The previous ``update``: every layer's output gradient and input kept until the whole
    backward pass ends, norms taken after it. Same numbers; kept for tests and benchmarks only."""
    grads, inputs = output_gradients(params, cfg, batch, max_targets)
    keep = batch["attention_mask"][..., None]
    new = {}
    for name, acc in state.items():
        g = jnp.where(keep, grads[name].astype(jnp.float32), 0.0)  # padding carries no gradient anyway
        norms = neuron_sq_norms(g, inputs[name], neuron_axis, backend)  # [B, n]
        new[name] = acc + jnp.sum(norms, axis=0)
    return new
