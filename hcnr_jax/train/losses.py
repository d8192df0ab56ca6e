"""Training losses: SFT, DPO and ORPO, as pure float32 functions (jit- and grad-safe).

The LM head is applied only at target-predicting positions: each row's positions ``t - 1`` with
``loss_mask[:, t]`` are gathered, in order, into ``capacity`` slots (static, as
``stats.fisher_accum.gathered_loss`` does; ``stats.fisher_accum.target_capacity`` of the whole data
set gives one capacity for a run, so one compilation). A row with more targets than ``capacity``
loses the excess ones. Empty slots are exactly 0 and carry no gradient.

Conventions (those of Hugging Face TRL):

- SFT: the mean NLL over every target token of the batch (a token-level mean, not a mean of
  per-sample means).
- DPO (Rafailov et al. 2023, sigmoid loss): sequence log-probabilities are *sums* over the target
  tokens; ``loss = -log sigmoid(beta * ((pc - rc) - (pr - rr)))``.
- ORPO (Hong et al. 2024, TRL's ``ORPOTrainer``): log-probabilities are *per-token means*;
  ``log odds(y|x) = m - log(1 - exp(m))``, ``loss = nll(chosen) + lam * -log sigmoid(log odds_c -
  log odds_r)``.

Every loss is finite, value and gradient, for any finite inputs (log-probabilities of 0, of
-1e-12 or of -1e4 included): log-sigmoids are ``jax.nn.log_sigmoid``, ``log(1 - exp(m))`` is
computed stably and ``m`` is clamped strictly below 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from hcnr_jax.config import ModelConfig
from hcnr_jax.model import forward, lm_head
from hcnr_jax.params import Params
from hcnr_jax.stats.fisher_accum import gather_targets

Batch = Mapping[str, jax.Array]

# ORPO's mean log-probabilities are clamped to at most this (strictly negative) value, so that
# log(1 - exp(m)) and its gradient 1 / (1 - exp(m)) stay finite in float32 (m = 0 happens: a
# float32 log_softmax rounds a confident token's log-probability to exactly 0).
ORPO_MAX_MEAN_LOGP = -1e-20
# DPO's scaled log-ratios are clamped to this magnitude: log-probabilities are <= 0, so this binds
# only for absurd inputs (|log p| ~ 1e37), where the float32 differences would overflow.
_DPO_LIMIT = 1e37


def token_logprobs(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
                   loss_mask: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Log-probabilities of the targets: ``(logp [B, K] float32, valid [B, K] bool)``, K = ``capacity``.

    ``loss_mask[b, t]`` marks ``input_ids[b, t]`` as a target predicted from the tokens before it
    (``loss_mask[:, 0]`` is ignored). Slot k of row b holds the row's k-th target in order; slots
    past the row's targets have ``valid`` False and ``logp`` exactly 0 (value and gradient).
    """
    out = forward(params, cfg, input_ids, attention_mask, return_logits=False)
    hidden, labels, valid = gather_targets(out.hidden, input_ids, loss_mask, capacity)
    logp_all = jax.nn.log_softmax(lm_head(params, cfg, hidden).astype(jnp.float32), axis=-1)
    logp = jnp.take_along_axis(logp_all, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.where(valid, logp, 0.0), valid


def sft_loss(params: Params, cfg: ModelConfig, batch: Batch, capacity: int) -> tuple[jax.Array, dict]:
    """Mean NLL over all target tokens of the batch: ``(loss, {"loss": loss, "tokens": n})``.

    ``batch``: ``input_ids``, ``attention_mask``, ``loss_mask`` (``[B, T]``). A batch without
    targets has loss 0 (and gradient 0)."""
    logp, valid = token_logprobs(params, cfg, batch["input_ids"], batch["attention_mask"],
                                 batch["loss_mask"], capacity)
    n = jnp.sum(valid, dtype=jnp.int32)
    loss = -jnp.sum(logp) / jnp.maximum(n, 1).astype(jnp.float32)
    return loss, {"loss": loss, "tokens": n}


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, beta: float) -> tuple[jax.Array, dict]:
    """Sigmoid DPO per pair: ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))``, all ``[B]``.

    Inputs are summed target log-probabilities (``preference_logps``'s ``chosen_logp`` /
    ``rejected_logp``) of the policy and of the frozen reference. Returns ``(loss [B], metrics)``,
    the metrics ``[B]`` too (TRL's names): implicit rewards ``beta * (policy - ref)`` of chosen
    and rejected, their margin, and accuracy (1.0 where the chosen reward is larger)."""
    pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    chosen = jnp.clip(beta * (pc - rc), -_DPO_LIMIT, _DPO_LIMIT)
    rejected = jnp.clip(beta * (pr - rr), -_DPO_LIMIT, _DPO_LIMIT)
    margin = chosen - rejected
    loss = -jax.nn.log_sigmoid(margin)
    metrics = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": margin,
        "rewards/accuracies": (chosen > rejected).astype(jnp.float32),
    }
    return loss, metrics


def log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for ``x < 0``, accurate everywhere (Maechler 2012): ``log(-expm1(x))``
    for ``x > -ln 2``, else ``log1p(-exp(x))``. Both branches are evaluated at safe arguments, so
    the unused one never puts a NaN into the gradient."""
    x = jnp.asarray(x, jnp.float32)
    near = x > -jnp.log(2.0)
    x_near = jnp.where(near, x, -1.0)
    x_far = jnp.where(near, -1.0, x)
    return jnp.where(near, jnp.log(-jnp.expm1(x_near)), jnp.log1p(-jnp.exp(x_far)))


def orpo_loss(chosen_mean_logp: jax.Array, rejected_mean_logp: jax.Array, chosen_nll: jax.Array,
              lam: float) -> tuple[jax.Array, dict]:
    """ORPO per pair: ``chosen_nll + lam * -log sigmoid(log odds_c - log odds_r)``, all ``[B]``.

    ``*_mean_logp`` are per-token mean target log-probabilities (``preference_logps``), clamped
    to ``ORPO_MAX_MEAN_LOGP`` (< 0); ``log odds = m - log(1 - exp(m))``. ``chosen_nll`` is the
    chosen answer's mean NLL. Metrics ``[B]`` (TRL's names): ``nll``, ``log_odds_ratio`` (the
    log-sigmoid, <= 0), ``log_odds_chosen`` (the log odds difference), rewards ``lam * m`` of
    chosen and rejected, margin, accuracy."""
    mc = jnp.minimum(jnp.asarray(chosen_mean_logp, jnp.float32), ORPO_MAX_MEAN_LOGP)
    mr = jnp.minimum(jnp.asarray(rejected_mean_logp, jnp.float32), ORPO_MAX_MEAN_LOGP)
    nll = jnp.asarray(chosen_nll, jnp.float32)
    log_odds = (mc - log1mexp(mc)) - (mr - log1mexp(mr))
    log_sig = jax.nn.log_sigmoid(log_odds)
    loss = nll - lam * log_sig
    chosen, rejected = lam * mc, lam * mr
    metrics = {
        "nll": nll,
        "log_odds_ratio": log_sig,
        "log_odds_chosen": log_odds,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).astype(jnp.float32),
    }
    return loss, metrics


def _pad_to(x: jax.Array, t: int) -> jax.Array:
    return x if x.shape[1] == t else jnp.pad(x, ((0, 0), (0, t - x.shape[1])))


def preference_logps(params: Params, cfg: ModelConfig, batch: Batch, capacity: int) -> dict[str, jax.Array]:
    """Target log-probabilities of a pair batch, chosen and rejected in one forward pass.

    ``batch``: ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_loss_mask`` and the same
    ``rejected_*`` (``[B, T]``; the two T may differ, the shorter is right-padded). Returns ``[B]``
    arrays: ``chosen_logp`` / ``rejected_logp`` (sums over targets, for DPO),
    ``chosen_mean_logp`` / ``rejected_mean_logp`` (per-token means, for ORPO; 0 without targets),
    ``chosen_nll`` (= -``chosen_mean_logp``), ``chosen_tokens`` / ``rejected_tokens`` (int32)."""
    parts = ("input_ids", "attention_mask", "loss_mask")
    t = max(batch[f"{side}_{k}"].shape[1] for side in ("chosen", "rejected") for k in parts)
    joined = {k: jnp.concatenate([_pad_to(jnp.asarray(batch[f"chosen_{k}"]), t),
                                  _pad_to(jnp.asarray(batch[f"rejected_{k}"]), t)], axis=0) for k in parts}
    b = batch["chosen_input_ids"].shape[0]
    logp, valid = token_logprobs(params, cfg, joined["input_ids"].astype(jnp.int32),
                                 joined["attention_mask"].astype(bool), joined["loss_mask"].astype(bool), capacity)
    total = jnp.sum(logp, axis=1)
    count = jnp.sum(valid, axis=1, dtype=jnp.int32)
    mean = total / jnp.maximum(count, 1).astype(jnp.float32)
    return {
        "chosen_logp": total[:b],
        "rejected_logp": total[b:],
        "chosen_mean_logp": mean[:b],
        "rejected_mean_logp": mean[b:],
        "chosen_nll": -mean[:b],
        "chosen_tokens": count[:b],
        "rejected_tokens": count[b:],
    }
