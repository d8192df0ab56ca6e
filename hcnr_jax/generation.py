"""Batched greedy generation with the KV cache.

``greedy_tokens`` is the pure, jitted core (left-padded prompts in, new tokens out);
``greedy_tokens_packed`` the same for prompts packed by ``pack_prompts`` (no prefill work on
padding, a shared prefix such as the chat template's system prompt computed once), which
``generate_ids`` uses; ``generate`` is the text front end (chat template, batching, decoding).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hcnr_jax.config import ModelConfig
from hcnr_jax.model import KVCache, forward, init_cache, lm_head
from hcnr_jax.params import Params


def _decode(params: Params, cfg: ModelConfig, first: jax.Array, cache: KVCache, eos_ids: jax.Array,
            max_new_tokens: int, pad_id: int | jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy steps from each row's first new token ``first [B]`` and the prompts' cache."""
    b = first.shape[0]

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
    state = (jnp.zeros((), jnp.int32), first, jnp.zeros((b,), bool), cache, buf)
    _, _, _, _, buf = jax.lax.while_loop(cond, body, state)
    is_eos = jnp.isin(buf, eos_ids)
    first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens)
    return buf, first_eos.astype(jnp.int32)


def _first_token(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """hidden [B, D] of each prompt's last token -> greedy first new token [B]."""
    return jnp.argmax(lm_head(params, cfg, hidden[:, None])[:, 0], axis=-1).astype(jnp.int32)


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
    first = _first_token(params, cfg, out.hidden[:, -1])
    return _decode(params, cfg, first, out.cache, eos_ids, max_new_tokens, pad_id)


class PackedPrompts(NamedTuple):
    """A batch of prompts packed for one prefill without padding waste (``pack_prompts``).

    Lanes hold the prompts' common prefix once, then each prompt's remaining tokens as its own
    segment; ``gather`` lays the computed keys and values out as the left-padded per-row cache
    that decoding continues from.
    """

    ids: np.ndarray  # [R, C] int32 lanes of packed tokens
    segments: np.ndarray  # [R, C] int32: 0 the shared prefix, r + 1 the rest of row r
    positions: np.ndarray  # [R, C] int32 position of each token in its own prompt
    mask: np.ndarray  # [R, C] bool: a real token (lanes end in padding)
    gather: np.ndarray  # [B, W] int32 flat lane index (lane * C + i) of the token at each cache slot
    valid: np.ndarray  # [B, W] bool: the slot holds a prompt token (prompts are right-aligned)
    last: np.ndarray  # [B] int32 flat lane index of each prompt's last token


def _bucket_tokens(n: int) -> int:
    """Round a packed length up to one of a few sizes per octave (at most 25% waste), so that
    batches of similar size share a compilation."""
    return _bucket(n, max(64, 1 << max(n.bit_length() - 3, 0)))


PackShape = tuple[int, int, int]  # (lanes R, lane length C, cache width W)


def _layout(rows: list[list[int]], lane_tokens: int) -> tuple[int, list[list[int]], PackShape]:
    """(shared prefix length, rows of each lane, the smallest shape that holds them)."""
    # Keep at least one token of each prompt out of the prefix: its hidden state gives the first token.
    shortest = min(map(len, rows))
    p = next((i for i in range(shortest - 1) if len({row[i] for row in rows}) > 1), shortest - 1)
    lanes: list[list[int]] = [[]]
    size = p
    for r, row in enumerate(rows):
        if lanes[-1] and size + len(row) - p > lane_tokens:
            lanes.append([])
            size = p
        lanes[-1].append(r)
        size += len(row) - p
    c = _bucket_tokens(max(p + sum(len(rows[r]) - p for r in lane) for lane in lanes))
    return p, lanes, (len(lanes), c, _bucket(max(map(len, rows))))


def _checked_rows(prompt_ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    rows = [list(p) for p in prompt_ids]
    if not rows or len(rows) > batch_size:
        raise ValueError(f"pack_prompts needs 1 to {batch_size} prompts, got {len(rows)}")
    if not all(rows):
        raise ValueError("generation needs at least one prompt token per row")
    return rows


def pack_prompts(prompt_ids: Sequence[Sequence[int]], batch_size: int, pad_id: int = 0,
                 lane_tokens: int = 1024, shape: PackShape = (0, 0, 0)) -> PackedPrompts:
    """Pack up to ``batch_size`` prompts: their common prefix once per lane, then each prompt's
    remaining tokens. Attention within a lane grows with its length squared, so consecutive
    prompts are split over lanes of about ``lane_tokens`` tokens. Rows past the prompts
    (a short last batch) get one dummy token, and their outputs are meaningless.

    ``shape = (R, C, W)``: lower bounds on the lane count, lane length and cache width (extra
    lanes stay empty); batches packed to the same shape share one compilation (``pack_shape``)."""
    rows = _checked_rows(prompt_ids, batch_size)
    p, lanes, need = _layout(rows, lane_tokens)
    n_lanes, c, w = (max(a, b) for a, b in zip(shape, need, strict=True))
    size = (n_lanes, c)
    ids, seg, pos = np.full(size, pad_id, np.int32), np.zeros(size, np.int32), np.zeros(size, np.int32)
    mask = np.zeros(size, bool)
    gather, valid = np.zeros((batch_size, w), np.int32), np.zeros((batch_size, w), bool)
    last = np.zeros((batch_size,), np.int32)
    valid[len(rows):, -1] = True  # filler rows: one (dummy) token, so nothing is fully masked
    for lane, members in enumerate(lanes):
        base = lane * c
        ids[lane, :p], pos[lane, :p], mask[lane, :p] = rows[members[0]][:p], np.arange(p), True
        at = p
        for r in members:
            row = rows[r]
            n = len(row) - p
            ids[lane, at : at + n], seg[lane, at : at + n] = row[p:], r + 1
            pos[lane, at : at + n], mask[lane, at : at + n] = np.arange(p, len(row)), True
            slots = np.concatenate([np.arange(p), at + np.arange(n)]) + base
            gather[r, w - len(row) :], valid[r, w - len(row) :] = slots, True
            last[r] = base + at + n - 1
            at += n
    return PackedPrompts(ids, seg, pos, mask, gather, valid, last)


def pack_shape(prompt_ids: Sequence[Sequence[int]], batch_size: int, lane_tokens: int = 1024) -> PackShape:
    """The largest (R, C, W) over consecutive batches of ``batch_size`` of these prompts: packing
    every batch to it costs some padding and saves a compilation (~15 s for SmolLM2 on a CPU) per
    distinct shape."""
    shapes = [_layout(_checked_rows(prompt_ids[s : s + batch_size], batch_size), lane_tokens)[2]
              for s in range(0, len(prompt_ids), batch_size)]
    return tuple(max(dim) for dim in zip(*shapes, strict=True))  # type: ignore[return-value]


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def greedy_tokens_packed(
    params: Params,
    cfg: ModelConfig,
    packed: PackedPrompts,
    eos_ids: jax.Array,
    max_new_tokens: int,
    pad_id: int | jax.Array = 0,
) -> tuple[jax.Array, jax.Array]:
    """``greedy_tokens`` for prompts packed by ``pack_prompts``: the same tokens, with the prefill
    spending no work on padding and computing a shared prefix once per lane."""
    r, c = packed.ids.shape
    dtype = params["model"]["embed_tokens"]["weight"].dtype
    out = forward(params, cfg, packed.ids, packed.mask, packed.positions, cache=init_cache(cfg, r, c, dtype),
                  segment_ids=packed.segments, return_logits=False)
    first = _first_token(params, cfg, out.hidden.reshape(r * c, -1)[packed.last])

    def rows(kv: jax.Array) -> jax.Array:  # [L, R, C, K, H] -> [L, B, W + max_new, K, H]
        kv = kv.reshape(kv.shape[0], r * c, *kv.shape[3:])[:, packed.gather]
        return jnp.pad(kv, ((0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0)))

    w = packed.gather.shape[1]
    cache = KVCache(rows(out.cache.k), rows(out.cache.v), jnp.pad(packed.valid, ((0, 0), (0, max_new_tokens))),
                    jnp.asarray(w, jnp.int32))
    return _decode(params, cfg, first, cache, eos_ids, max_new_tokens, pad_id)


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
    model: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 16,
    shape: PackShape | None = None,
) -> list[list[int]]:
    """Greedy new token ids (end of turn included when reached) for each prompt's token ids.

    Prompts are batched in order of length (returned in the input order) and every batch is packed
    to one shape (``shape``, default ``pack_shape`` of these prompts): one compilation per call.
    A caller that feeds one dataset in several calls passes the dataset's ``pack_shape``.
    """
    eos = jnp.asarray(eos_token_ids(model), jnp.int32)
    pad = model.tokenizer.pad_token_id if model.tokenizer is not None and model.tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    if shape is None:
        shape = pack_shape([prompt_ids[i] for i in order], batch_size)
    results: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        chunk = [prompt_ids[i] for i in rows]
        packed = pack_prompts(chunk, batch_size, pad, shape=shape)
        toks, lengths = greedy_tokens_packed(model.params, model.config, jax.tree.map(jnp.asarray, packed), eos,
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
