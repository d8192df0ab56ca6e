"""Log-likelihood of given responses: a forward pass, no generation.

`response_logprobs` scores how much a model believes each ``{"prompt", "response"}`` record's
response (the mean log-probability of its tokens, in the chat format every command uses). It is the
task-retention measure of `hcnr eval` (the gold answer of each held-out task question) and the
development score of `hcnr repair --choose` / `hcnr merge --choose` (docs/method.md).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hcnr_jax.config import ModelConfig
from hcnr_jax.data.samples import Samples, samples_from_records
from hcnr_jax.params import Params
from hcnr_jax.pretrained import Pretrained
from hcnr_jax.stats.fisher_accum import target_capacity
from hcnr_jax.train.losses import token_logprobs


@functools.partial(jax.jit, static_argnames=("cfg", "capacity"))
def _mean_logprobs(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
                   loss_mask: jax.Array, capacity: int) -> jax.Array:
    """[B] mean log-probability of each row's target tokens (float32)."""
    with jax.default_matmul_precision("highest"):
        logp, valid = token_logprobs(params, cfg, input_ids, attention_mask, loss_mask, capacity)
    return jnp.sum(logp, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1).astype(jnp.float32)


def samples_logprobs(params: Params, cfg: ModelConfig, samples: Samples, batch_size: int = 16) -> np.ndarray:
    """[N] mean per-token log-probability of each sample's targets (the last batch padded, so one
    compilation serves every batch)."""
    n = len(samples)
    capacity = target_capacity(samples.loss_mask)
    out = []
    for s in range(0, n, batch_size):
        idx = np.arange(s, s + batch_size) % n  # wrap-around padding; the extra rows are dropped
        lp = _mean_logprobs(params, cfg, jnp.asarray(samples.input_ids[idx]), jnp.asarray(samples.attention_mask[idx]),
                            jnp.asarray(samples.loss_mask[idx]), capacity)
        out.append(np.asarray(lp)[: min(batch_size, n - s)])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def response_logprobs(model: Pretrained, records: Sequence[dict], max_length: int = 256,
                      batch_size: int = 16, source: str = "<records>") -> np.ndarray:
    """[N] mean per-token log-probability of each record's ``response`` given its ``prompt``."""
    samples = samples_from_records(records, model.tokenizer, max_length=max_length, source=source,
                                   vocab_size=model.config.vocab_size)
    return samples_logprobs(model.params, model.config, samples, batch_size)
