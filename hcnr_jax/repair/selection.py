"""Stage 1 of HCNR: which neurons to restore (docs/method.md), as pure functions over arrays.

Per layer j (one linear weight): Fisher scores ``s_hon, s_task [n_neurons]`` -> priority ``r`` ->
candidates ``M_j`` = top ``r_iw`` of the neurons by r. Over layers: perturbation
``d_j = ||(W_sft - W_orig) * M_j||_F / ||W_orig * M_j||_F`` -> keep the top ``r_cw`` of layers
(or of blocks, with ``layer_unit=block``) by d. The honesty-critical set is M_j on kept layers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hcnr_jax.errors import HcnrError

TINY = float(np.finfo(np.float32).tiny)


def top_count(fraction: float, n: int) -> int:
    """How many of ``n`` items ``fraction`` selects: round half up, at least 1, at most n."""
    return int(min(n, max(1, np.floor(fraction * n + 0.5))))


def normalise(s: np.ndarray, eps: float) -> np.ndarray:
    """Scores normalised to sum to 1 within the layer, plus ``eps`` (float32, [n])."""
    s = np.asarray(s, np.float32)
    return s / np.float32(max(float(s.sum(dtype=np.float64)), TINY)) + np.float32(eps)


def priority_scores(s_hon: np.ndarray, s_task: np.ndarray, priority: str, eps: float,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """Priority ``r [n]`` of each neuron of one layer; higher = restore first.

    ``kl``: p_hon log(p_hon / p_task) [paper]; ``diff``: p_hon - p_task; ``hon_only``: p_hon;
    ``random``: uniform draws from ``rng``. p = normalised score + eps.
    """
    s_hon, s_task = np.asarray(s_hon), np.asarray(s_task)
    if s_hon.shape != s_task.shape or s_hon.ndim != 1:
        raise HcnrError(f"Fisher shapes differ: s_hon {s_hon.shape}, s_task {s_task.shape}")
    if not (np.all(np.isfinite(s_hon)) and np.all(np.isfinite(s_task))):
        raise HcnrError("non-finite Fisher scores (did the loss overflow?)")
    p_hon, p_task = normalise(s_hon, eps), normalise(s_task, eps)
    if priority == "kl":
        return p_hon * np.log(p_hon / p_task)
    if priority == "diff":
        return p_hon - p_task
    if priority == "hon_only":
        return p_hon
    if priority == "random":
        if rng is None:
            raise HcnrError("priority=random needs a random generator")
        return rng.random(s_hon.shape[0]).astype(np.float32)
    raise HcnrError(f"priority={priority!r}: unknown")


def top_mask(scores: np.ndarray, fraction: float) -> np.ndarray:
    """bool [n]: the top ``fraction`` of ``scores``; ties broken by lower index (deterministic)."""
    n = scores.shape[0]
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    mask = np.zeros(n, bool)
    mask[order[: top_count(fraction, n)]] = True
    return mask


@partial(jax.jit, static_argnames="neuron_axis")
def _masked_norms(w_orig: jax.Array, w_sft: jax.Array, mask: jax.Array, neuron_axis: str) -> jax.Array:
    a = w_orig.astype(jnp.float32)
    d = w_sft.astype(jnp.float32) - a
    m = mask[None, :] if neuron_axis == "input" else mask[:, None]
    # Masked-out entries add exact zeros; XLA's float32 reductions (pairwise on CPU, trees on
    # GPU) stay within ~1e-7 relative of a float64 sum over the same float32 products.
    return jnp.stack([jnp.sum(jnp.where(m, d * d, 0.0)), jnp.sum(jnp.where(m, a * a, 0.0))])


def masked_norms(w_orig: Any, w_sft: Any, mask: Any, neuron_axis: str) -> tuple[float, float]:
    """(||(W_sft - W_orig) * M||_F^2, ||W_orig * M||_F^2), M selecting columns or rows.

    Computed where the weights are (one jitted program on the device; NumPy inputs are copied
    there), in float32; only the two sums come back. ``mask``: bool [n] or an index array."""
    if neuron_axis not in ("input", "output"):
        raise HcnrError(f"neuron_axis={neuron_axis!r}: unknown")
    w_orig, w_sft = jnp.asarray(w_orig), jnp.asarray(w_sft)
    n = w_orig.shape[1] if neuron_axis == "input" else w_orig.shape[0]
    mask = np.asarray(mask)
    if mask.dtype != bool:  # an index array
        idx, mask = mask.astype(np.int64), np.zeros(n, bool)
        mask[idx] = True
    num, den = np.asarray(_masked_norms(w_orig, w_sft, jnp.asarray(mask), neuron_axis), np.float64)
    return float(num), float(den)


def perturbation(num_sq: float, den_sq: float) -> float:
    """d = sqrt(num) / sqrt(den); a zero denominator gives inf if anything moved, else 0."""
    if den_sq <= 0.0:
        return float("inf") if num_sq > 0.0 else 0.0
    return float(np.sqrt(num_sq / den_sq))


_BLOCK = re.compile(r"^model\.layers\.(\d+)\.")


def block_of(name: str) -> int:
    m = _BLOCK.match(name)
    if m is None:
        raise HcnrError(f"{name}: not a transformer-block weight")
    return int(m.group(1))


def keep_units(d: Sequence[float], sizes: Sequence[int], fraction: float, budget: str) -> np.ndarray:
    """bool [n_units]: the top ``fraction`` of units by perturbation ``d``.

    ``budget=count``: that fraction of the units. ``budget=params``: the prefix (by d) whose total
    size is closest to ``fraction`` of all units' sizes, at least one unit. Ties: lower index first.
    """
    d = np.asarray(d, np.float64)
    order = np.argsort(-d, kind="stable")
    if budget == "count":
        k = top_count(fraction, len(d))
    elif budget == "params":
        sizes = np.asarray(sizes, np.float64)[order]
        cum = np.cumsum(sizes)
        k = int(np.argmin(np.abs(cum - fraction * cum[-1]))) + 1
    else:
        raise HcnrError(f"layer_budget={budget!r}: unknown")
    keep = np.zeros(len(d), bool)
    keep[order[:k]] = True
    return keep


@dataclass(frozen=True)
class LayerSelection:
    """Stage 1's outcome for one linear weight ``name``: its candidate neurons (``candidates``
    bool [n_neurons]), perturbation ``d`` of its selection unit (the layer, or its block with
    layer_unit=block) and ``d_layer`` of the layer alone, whether it is kept, and its shape."""

    name: str
    shape: tuple[int, int]
    candidates: np.ndarray
    d: float
    kept: bool
    d_layer: float

    @property
    def restored(self) -> np.ndarray:
        """bool [n_neurons]: the honesty-critical set A_hc (empty unless kept)."""
        return self.candidates if self.kept else np.zeros_like(self.candidates)

    @property
    def restored_params(self) -> int:
        per_neuron = self.shape[0] if self.candidates.shape[0] == self.shape[1] else self.shape[1]
        return int(self.restored.sum()) * per_neuron


def select(
    names: Sequence[str],
    weights: Callable[[str], tuple[Any, Any]],
    s_hon: Mapping[str, np.ndarray],
    s_task: Mapping[str, np.ndarray],
    *,
    r_iw: float,
    r_cw: float,
    priority: str = "kl",
    layer_unit: str = "module",
    layer_budget: str = "count",
    neuron_axis: str = "input",
    eps: float = 1e-8,
    seed: int = 0,
) -> list[LayerSelection]:
    """Stage 1 over every layer in ``names`` (HF linear weight names, in model order).

    ``weights(name) -> (W_orig, W_sft)`` ([out, in] each, jax or NumPy arrays), fetched one layer
    at a time so that the caller decides what stays in memory; the norms are taken on the device
    and only two scalars per layer come to the host. Fisher dicts map the same names to [n_neurons].
    """
    cand: dict[str, np.ndarray] = {}
    norms: dict[str, tuple[float, float]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for i, name in enumerate(names):
        if name not in s_hon or name not in s_task:
            raise HcnrError(f"{name}: no Fisher scores")
        # One generator per layer, seeded by (seed, layer index): independent of other layers.
        rng = np.random.default_rng([seed, i]) if priority == "random" else None
        w_orig, w_sft = weights(name)
        n = w_orig.shape[1] if neuron_axis == "input" else w_orig.shape[0]
        if np.asarray(s_hon[name]).shape != (n,):
            raise HcnrError(f"{name}: Fisher has shape {np.asarray(s_hon[name]).shape}, expected ({n},)")
        cand[name] = top_mask(priority_scores(s_hon[name], s_task[name], priority, eps, rng), r_iw)
        norms[name] = masked_norms(w_orig, w_sft, cand[name], neuron_axis)
        shapes[name] = tuple(w_orig.shape)

    if layer_unit == "module":
        units = [[n] for n in names]
    elif layer_unit == "block":
        blocks: dict[int, list[str]] = {}
        for n in names:
            blocks.setdefault(block_of(n), []).append(n)
        units = [blocks[b] for b in sorted(blocks)]
    else:
        raise HcnrError(f"layer_unit={layer_unit!r}: unknown")
    d_unit = [perturbation(sum(norms[n][0] for n in u), sum(norms[n][1] for n in u)) for u in units]
    size_unit = [sum(int(np.prod(shapes[n])) for n in u) for u in units]
    keep = keep_units(d_unit, size_unit, r_cw, layer_budget)
    unit_of = {n: k for k, u in enumerate(units) for n in u}
    return [LayerSelection(n, shapes[n], cand[n], d_unit[unit_of[n]], bool(keep[unit_of[n]]), perturbation(*norms[n]))
            for n in names]
