"""Layer-input second moments (docs/method.md, Stage 2): ``H_j = sum X^T X`` over every non-padding
token, float32. Layers reading the same input (q/k/v, gate/up) share one accumulator. The forward
pass and the Gram run at ``precision=HIGHEST`` (exact float32 on every backend, never TF32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hcnr_jax.config import ModelConfig
from hcnr_jax.kernels.gram import gram
from hcnr_jax.model import after, forward
from hcnr_jax.params import SHARED_INPUT, Params, get, linear_names
from hcnr_jax.precision import HIGHEST
from hcnr_jax.stats.fisher_accum import Batch


def owner(name: str) -> str:
    """The weight whose accumulator ``name`` uses (k/v -> q, up -> gate, others themselves)."""
    prefix, module, leaf = name.rsplit(".", 2)
    return f"{prefix}.{SHARED_INPUT.get(module, module)}.{leaf}"


def groups(cfg: ModelConfig) -> dict[str, list[str]]:
    """Accumulator name -> the linear weights that read its input."""
    out: dict[str, list[str]] = {}
    for name in linear_names(cfg):
        out.setdefault(owner(name), []).append(name)
    return out


def split_passes(names: list[str], cfg: ModelConfig, passes: int) -> list[list[str]]:
    """``names`` (linear weights) in at most ``passes`` groups, one per pass over the data, whose
    accumulators hold about equal bytes (largest first, each to the lightest group); weights that
    share an accumulator stay together. Fewer groups when there are fewer accumulators."""
    from hcnr_jax.params import param_specs

    specs = param_specs(cfg)
    by_owner: dict[str, list[str]] = {}
    for n in names:
        by_owner.setdefault(owner(n), []).append(n)
    bins: list[tuple[int, list[str]]] = [(0, []) for _ in range(min(passes, len(by_owner)))]
    for o in sorted(by_owner, key=lambda o: (-specs[o][1], o)):
        i = min(range(len(bins)), key=lambda i: bins[i][0])
        size, members = bins[i]
        bins[i] = (size + specs[o][1] ** 2, members + by_owner[o])
    return [sorted(members) for _, members in bins if members]


def init(params: Params, cfg: ModelConfig, owners: tuple[str, ...] | None = None) -> dict[str, jax.Array]:
    """Zero accumulators: owner weight name -> float32 [in, in] (only ``owners`` when given)."""
    return {n: jnp.zeros((get(params, n).shape[1],) * 2, jnp.float32) for n in groups(cfg)
            if owners is None or n in owners}


def update(state: dict[str, jax.Array], params: Params, batch: Batch, *, cfg: ModelConfig,
           backend: str = "auto") -> dict[str, jax.Array]:
    """Add ``X^T X`` of the batch's non-padding tokens to each accumulator. Pure; jit with ``cfg``
    and ``backend`` static.

    Each Gram is taken as its layer runs, and the layer's matmul waits for it (``model.after``):
    otherwise a scheduler may defer every Gram to the end and keep every kept layer's input live
    (XLA's CPU scheduler did). Same numbers: ``after`` adds an exact zero."""
    mask = batch["attention_mask"].reshape(-1)
    new = dict(state)

    def linear(p, x, name):
        if name in new:  # the first layer reading this input (q of q/k/v, gate of gate/up)
            new[name] = gram(new[name], x.reshape(-1, x.shape[-1]), mask, backend)
            x = after(x, new[name])
        # The weight too waits for the layer's input: a CPU compile converts bf16 weights to float32
        # copies, which it would otherwise make all at once at the start.
        y = jnp.einsum("bti,oi->bto", x, after(p["weight"], x), precision=HIGHEST)
        return y + p["bias"] if "bias" in p else y

    forward(params, cfg, batch["input_ids"], batch["attention_mask"], return_logits=False, precision=HIGHEST,
            linear=linear)
    return new


def expand(state: dict[str, object], cfg: ModelConfig) -> dict[str, object]:
    """Owner-keyed results -> every linear weight name (sharing layers get the same object)."""
    return {member: state[name] for name, members in groups(cfg).items() if name in state for member in members}
