"""Batched greedy generation with the KV cache.

``greedy_tokens`` is the pure, jitted core (left-padded prompts in, new tokens out);
``generate`` is the text front end (chat template, batching, length bucketing, decoding).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hcnr_jax.config import ModelConfig
from hcnr_jax.model import forward, init_cache, lm_head
from hcnr_jax.params import Params


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def greedy_tokens(
    params: Params,
    cfg: ModelConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    eos_ids: jax.Array,
    max_new_tokens: int,
    pad_id: int | jax.Array = 0,
) -> tuple[jax.Array, jax.Array]:
    """Greedy continuation of left-padded prompts ``input_ids [B, T]``.

    Returns ``tokens [B, max_new_tokens]`` (``pad_id`` after a row's end of sequence) and
    ``lengths [B]``: the number of generated tokens, the end-of-sequence token included.
    """
    b, t = input_ids.shape
    dtype = params["model"]["embed_tokens"]["weight"].dtype
    cache = init_cache(cfg, b, t + max_new_tokens, dtype)
    out = forward(params, cfg, input_ids, attention_mask, cache=cache, return_logits=False)
    first = jnp.argmax(lm_head(params, cfg, out.hidden[:, -1:])[:, 0], axis=-1).astype(jnp.int32)

    def cond(state: tuple) -> jax.Array:
        i, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        i, tok, done, cache, buf = state
        buf = buf.at[:, i].set(jnp.where(done, pad_id, tok))
        done = done | jnp.isin(tok, eos_ids)
        step = forward(params, cfg, tok[:, None], jnp.ones((b, 1), bool), cache=cache, return_logits=False)
        nxt = jnp.argmax(lm_head(params, cfg, step.hidden)[:, 0], axis=-1).astype(jnp.int32)
        return i + 1, nxt, done, step.cache, buf

    buf = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    state = (jnp.zeros((), jnp.int32), first, jnp.zeros((b,), bool), out.cache, buf)
    _, _, _, _, buf = jax.lax.while_loop(cond, body, state)
    is_eos = jnp.isin(buf, eos_ids)
    first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens)
    return buf, first_eos.astype(jnp.int32)


def eos_token_ids(model: Any) -> list[int]:
    """End-of-turn ids: the generation config's eos ids, else the tokenizer's."""
    ids: Any = None
    if model.generation_config:
        ids = model.generation_config.get("eos_token_id")
    if ids is None and "generation_config.json" in model.carried:
        import json

        ids = json.loads(model.carried["generation_config.json"].read_text()).get("eos_token_id")
    if ids is None:
        ids = model.hf_config.get("eos_token_id")
    if ids is None and model.tokenizer is not None:
        ids = model.tokenizer.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if not ids:
        raise ValueError(f"{model.source}: no end-of-sequence token id in generation config or tokenizer")
    return ids


def _bucket(n: int, multiple: int = 32) -> int:
    return -(-n // multiple) * multiple


def chat_prompts(tokenizer: Any, prompts: Sequence[str], system: str | None = None) -> list[str]:
    """Render user prompts with the tokenizer's chat template, ready for the assistant's turn."""
    out = []
    for p in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        out.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return out


def generate_ids(
    model: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 16
) -> list[list[int]]:
    """Greedy new token ids (end of turn included when reached) for each prompt's token ids.

    Prompts are batched in order of length (returned in the input order): similar lengths share a
    batch, so less padding and fewer distinct bucket widths, i.e. fewer compilations.
    """
    eos = jnp.asarray(eos_token_ids(model), jnp.int32)
    pad = model.tokenizer.pad_token_id if model.tokenizer is not None and model.tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        chunk = [prompt_ids[i] for i in rows]
        if not all(len(p) for p in chunk):
            raise ValueError("generation needs at least one prompt token per row")
        width = _bucket(max(len(p) for p in chunk))
        # Fixed batch and bucketed width: a new length does not mean a new compilation.
        ids = np.full((batch_size, width), pad, np.int32)
        mask = np.zeros((batch_size, width), bool)
        for r, p in enumerate(chunk):
            ids[r, width - len(p) :] = p
            mask[r, width - len(p) :] = True
        mask[len(chunk) :, -1] = True  # filler rows: one real token so nothing is fully masked
        toks, lengths = greedy_tokens(model.params, model.config, jnp.asarray(ids), jnp.asarray(mask), eos,
                                      max_new_tokens, pad)
        toks, lengths = np.asarray(toks), np.asarray(lengths)
        results.update((i, toks[r, : lengths[r]].tolist()) for r, i in enumerate(rows))
    return [results[i] for i in range(len(prompt_ids))]


def generate(
    model: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    chat: bool = True,
    system: str | None = None,
) -> list[str]:
    """Greedy answers to ``prompts`` (rendered with the chat template unless ``chat=False``)."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.source}: generation from text needs a tokenizer")
    texts = chat_prompts(tok, prompts, system) if chat else list(prompts)
    prompt_ids = [tok(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    new = generate_ids(model, prompt_ids, max_new_tokens, batch_size)
    return [tok.decode(ids, skip_special_tokens=True).strip() for ids in new]
