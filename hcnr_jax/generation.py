"""Batched generation with the KV cache: greedy, or sampled with temperature and top-p.

``generate_tokens`` is the pure, jitted core (left-padded prompts in, new tokens out);
``generate_tokens_packed`` the same for prompts packed by ``pack_prompts`` (no prefill work on
padding, a shared prefix such as the chat template's system prompt computed once), which
``generate_ids`` uses; ``generate`` is the text front end (chat template, batching, decoding).
The sampling choice is the cores' ``keys`` argument: None decodes greedily (argmax); per-row PRNG
keys (``row_keys``) sample, each token drawn by ``sample_next``, the pure sampling step, with the
key ``fold_in(row_key, step)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hcnr_jax import interrupt
from hcnr_jax.config import ModelConfig
from hcnr_jax.model import KVCache, forward, init_kv_cache, lm_head
from hcnr_jax.params import Params

# (step, logits [B, V] float32) -> next tokens [B] int32; step 0 is the token after the prompt.
Picker = Callable[[jax.Array, jax.Array], jax.Array]


def _as_key(key: jax.Array) -> jax.Array:
    """A typed key array from a typed one or a raw ``uint32 [..., 2]`` one (``jax.random.PRNGKey``)."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    return key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def row_keys(key: jax.Array, indices: Sequence[int] | np.ndarray | jax.Array) -> jax.Array:
    """Per-row keys ``[B]``: ``fold_in(key, index)`` for each row's prompt index.

    A row's random stream depends on nothing but the key and its index, so its samples do not
    change with batch size, batch composition, packing or the order rows are processed in."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(_as_key(key), jnp.asarray(indices, jnp.uint32))


@jax.jit
def nucleus_mask(logits: jax.Array, top_p: float | jax.Array) -> jax.Array:
    """logits [B, V] -> bool [B, V]: the top-p (nucleus) set of each row.

    The smallest set of highest-probability tokens whose probability sums to >= ``top_p``, as
    transformers' ``TopPLogitsWarper``: a token is kept when the probability of the tokens ranked
    above it is < ``top_p``, so the top token always is. Equal logits rank by lower token id (as
    ``argmax`` does; torch's unstable sort leaves that order unspecified), which makes the set
    well defined at a tie and a tiny ``top_p`` keep exactly the argmax. ``top_p >= 1`` keeps
    every token: the float32 cumulative sum can round past 1 and must not drop the tail.
    """
    logits = logits.astype(jnp.float32)
    order = jnp.argsort(-logits, axis=-1, stable=True)  # descending; ties by ascending id
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    above = jnp.cumsum(probs, axis=-1) - probs  # mass ranked strictly above each sorted token
    keep_sorted = (above < top_p) | (jnp.asarray(top_p) >= 1.0)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)  # back to vocabulary order


@jax.jit
def sample_next(logits: jax.Array, key: jax.Array, temperature: float | jax.Array = 1.0,
                top_p: float | jax.Array = 1.0) -> jax.Array:
    """Draw the next token of each row from ``logits [B, V]`` -> ``[B]`` int32.

    ``key``: one key for the whole batch, or ``[B]`` keys, one per row (what generation passes,
    so that a row's draw does not depend on the other rows); typed or raw ``uint32``.
    ``temperature`` 0 gives ``argmax(logits)`` exactly (greedy); otherwise a draw from
    ``softmax(logits / temperature)`` restricted to its top-p nucleus (``nucleus_mask``,
    ``top_p`` in (0, 1]) and renormalised. ``top_p = 1`` is ``jax.random.categorical(key,
    logits / temperature)`` itself. Scalars ``temperature``/``top_p`` may be traced. float32.
    """
    logits = logits.astype(jnp.float32)
    t = jnp.asarray(temperature, jnp.float32)
    scaled = logits / jnp.where(t > 0, t, 1.0)  # t = 0 takes the argmax below; avoid inf/nan here
    masked = jnp.where(nucleus_mask(scaled, top_p), scaled, -jnp.inf)
    key = _as_key(key)
    if key.ndim == 0:
        drawn = jax.random.categorical(key, masked, axis=-1)
    else:
        drawn = jax.vmap(jax.random.categorical)(key, masked)
    return jnp.where(t > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def _greedy(step: jax.Array, logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _picker(keys: jax.Array | None, temperature: float | jax.Array, top_p: float | jax.Array) -> Picker:
    """Greedy without ``keys`` (the code greedy decoding always compiled to); else ``sample_next``
    with row r's key for step s = ``fold_in(keys[r], s)``."""
    if keys is None:
        return _greedy
    keys = _as_key(keys)

    def pick(step: jax.Array, logits: jax.Array) -> jax.Array:
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step.astype(jnp.uint32))
        return sample_next(logits, step_keys, temperature, top_p)

    return pick


def _decode(params: Params, cfg: ModelConfig, first: jax.Array, kv_cache: KVCache, eos_ids: jax.Array,
            max_new_tokens: int, pad_id: int | jax.Array, pick: Picker = _greedy) -> tuple[jax.Array, jax.Array]:
    """Decode steps 1.. from each row's first new token ``first [B]`` (step 0) and the prompts'
    KV cache, choosing each token with ``pick``; returns ``(tokens [B, max_new_tokens], lengths [B])``."""
    b = first.shape[0]

    def cond(state: tuple) -> jax.Array:
        i, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        i, tok, done, kv_cache, buf = state
        buf = buf.at[:, i].set(jnp.where(done, pad_id, tok))
        done = done | jnp.isin(tok, eos_ids)
        step = forward(params, cfg, tok[:, None], jnp.ones((b, 1), bool), kv_cache=kv_cache, return_logits=False)
        nxt = pick(i + 1, lm_head(params, cfg, step.hidden)[:, 0])
        return i + 1, nxt, done, step.kv_cache, buf

    buf = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    state = (jnp.zeros((), jnp.int32), first, jnp.zeros((b,), bool), kv_cache, buf)
    _, _, _, _, buf = jax.lax.while_loop(cond, body, state)
    is_eos = jnp.isin(buf, eos_ids)
    first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens)
    return buf, first_eos.astype(jnp.int32)


def _first_token(params: Params, cfg: ModelConfig, hidden: jax.Array, pick: Picker = _greedy) -> jax.Array:
    """hidden [B, D] of each prompt's last token -> first new token [B] (step 0)."""
    return pick(jnp.zeros((), jnp.int32), lm_head(params, cfg, hidden[:, None])[:, 0])


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def generate_tokens(
    params: Params,
    cfg: ModelConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    eos_ids: jax.Array,
    max_new_tokens: int,
    pad_id: int | jax.Array = 0,
    keys: jax.Array | None = None,
    temperature: float | jax.Array = 0.0,
    top_p: float | jax.Array = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """The continuation of left-padded prompts ``input_ids [B, T]``: greedy without ``keys``,
    sampled with them.

    Returns ``tokens [B, max_new_tokens]`` (``pad_id`` after a row's end of sequence) and
    ``lengths [B]``: the number of generated tokens, the end-of-sequence token included.
    With ``keys [B]`` (``row_keys``) tokens are drawn by ``sample_next(logits, fold_in(keys[r],
    step), temperature, top_p)``; ``temperature``/``top_p`` are traced (no recompilation when they
    change) and temperature 0 gives the greedy tokens. ``keys=None`` compiles the greedy program
    (argmax, no sampling code).
    """
    b, t = input_ids.shape
    dtype = params["model"]["embed_tokens"]["weight"].dtype
    pick = _picker(keys, temperature, top_p)
    kv_cache = init_kv_cache(cfg, b, t + max_new_tokens, dtype)
    out = forward(params, cfg, input_ids, attention_mask, kv_cache=kv_cache, return_logits=False)
    first = _first_token(params, cfg, out.hidden[:, -1], pick)
    return _decode(params, cfg, first, out.kv_cache, eos_ids, max_new_tokens, pad_id, pick)


class PackedPrompts(NamedTuple):
    """A batch of prompts packed for one prefill without padding waste (``pack_prompts``).

    Lanes hold the prompts' common prefix once, then each prompt's remaining tokens as its own
    segment; ``gather`` lays the computed keys and values out as the left-padded per-row KV cache
    that decoding continues from.
    """

    ids: np.ndarray  # [R, C] int32 lanes of packed tokens
    segments: np.ndarray  # [R, C] int32: 0 the shared prefix, r + 1 the rest of row r
    positions: np.ndarray  # [R, C] int32 position of each token in its own prompt
    mask: np.ndarray  # [R, C] bool: a real token (lanes end in padding)
    gather: np.ndarray  # [B, W] int32 flat lane index (lane * C + i) of the token at each KV-cache slot
    valid: np.ndarray  # [B, W] bool: the slot holds a prompt token (prompts are right-aligned)
    last: np.ndarray  # [B] int32 flat lane index of each prompt's last token


def _bucket_tokens(n: int) -> int:
    """Round a packed length up to one of a few sizes per octave (at most 25% waste), so that
    batches of similar size share a compilation."""
    return padded_length(n, max(64, 1 << max(n.bit_length() - 3, 0)))


PackShape = tuple[int, int, int]  # (lanes R, lane length C, KV-cache width W)


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
    return p, lanes, (len(lanes), c, padded_length(max(map(len, rows))))


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

    ``shape = (R, C, W)``: lower bounds on the lane count, lane length and KV-cache width (extra
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
def generate_tokens_packed(
    params: Params,
    cfg: ModelConfig,
    packed: PackedPrompts,
    eos_ids: jax.Array,
    max_new_tokens: int,
    pad_id: int | jax.Array = 0,
    keys: jax.Array | None = None,
    temperature: float | jax.Array = 0.0,
    top_p: float | jax.Array = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """``generate_tokens`` for prompts packed by ``pack_prompts``: the same tokens, with the prefill
    spending no work on padding and computing a shared prefix once per lane. Greedy without
    ``keys``; ``keys [B]`` (one per row, filler rows included), ``temperature`` and ``top_p``
    sample as in ``generate_tokens``."""
    r, c = packed.ids.shape
    dtype = params["model"]["embed_tokens"]["weight"].dtype
    pick = _picker(keys, temperature, top_p)
    out = forward(params, cfg, packed.ids, packed.mask, packed.positions, kv_cache=init_kv_cache(cfg, r, c, dtype),
                  segment_ids=packed.segments, return_logits=False)
    first = _first_token(params, cfg, out.hidden.reshape(r * c, -1)[packed.last], pick)

    def rows(kv: jax.Array) -> jax.Array:  # [L, R, C, K, H] -> [L, B, W + max_new, K, H]
        kv = kv.reshape(kv.shape[0], r * c, *kv.shape[3:])[:, packed.gather]
        return jnp.pad(kv, ((0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0)))

    w = packed.gather.shape[1]
    kv_cache = KVCache(rows(out.kv_cache.k), rows(out.kv_cache.v),
                       jnp.pad(packed.valid, ((0, 0), (0, max_new_tokens))), jnp.asarray(w, jnp.int32))
    return _decode(params, cfg, first, kv_cache, eos_ids, max_new_tokens, pad_id, pick)


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


def padded_length(n: int, multiple: int = 32) -> int:
    """``n`` rounded up to a multiple of ``multiple``: prompt widths in few shapes, so few compilations."""
    return -(-n // multiple) * multiple


def chat_prompts(tokenizer: Any, prompts: Sequence[str], system: str | None = None,
                 demos: Sequence[tuple[str, str]] = ()) -> list[str]:
    """Render user prompts with the tokenizer's chat template, ready for the assistant's turn.

    ``demos``: ``(prompt, response)`` pairs put before every prompt, in order, as earlier user /
    assistant turns (in-context demonstrations; after the system prompt, if any)."""
    history = [{"role": "system", "content": system}] if system else []
    for q, a in demos:
        history += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    out = []
    for p in prompts:
        messages = [*history, {"role": "user", "content": p}]
        out.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return out


def _check_sampling(temperature: float, top_p: float, key: Any) -> bool:
    """Validate the sampling settings; True when they ask for sampling (temperature > 0)."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    return temperature > 0


def generate_ids(
    model: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 16,
    shape: PackShape | None = None, *, temperature: float = 0.0, top_p: float = 1.0,
    key: jax.Array | None = None, indices: Sequence[int] | None = None, progress: str | None = None,
) -> list[list[int]]:
    """New token ids (end of turn included when reached) for each prompt's token ids.

    Greedy by default; ``temperature > 0`` samples (``sample_next``, nucleus ``top_p``) with the
    PRNG ``key``: prompt i's stream is ``fold_in(key, indices[i])`` (``indices`` defaults to
    0..n-1), step s's key ``fold_in(that, s)``, so the samples do not depend on batch size,
    batching or packing; a caller that feeds one list in several calls passes each prompt's index
    in the whole list. Prompts are batched in order of length (returned in the input order) and
    every batch is packed to one shape (``shape``, default ``pack_shape`` of these prompts): one
    compilation per call. A caller that feeds one dataset in several calls passes the dataset's
    ``pack_shape``. ``progress``: a progress bar over the prompts with this description.
    """
    sampling = _check_sampling(temperature, top_p, key)
    if indices is None:
        indices = range(len(prompt_ids))
    if len(indices) != len(prompt_ids):
        raise ValueError(f"{len(indices)} indices for {len(prompt_ids)} prompts")
    eos = jnp.asarray(eos_token_ids(model), jnp.int32)
    pad = model.tokenizer.pad_token_id if model.tokenizer is not None and model.tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    if shape is None:
        shape = pack_shape([prompt_ids[i] for i in order], batch_size)
    # float32 arrays, not Python floats: every setting then shares one compilation.
    settings = (jnp.float32(temperature), jnp.float32(top_p))
    results: dict[int, list[int]] = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(order), desc=progress, unit="prompt", disable=progress is None, dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        chunk = [prompt_ids[i] for i in rows]
        packed = pack_prompts(chunk, batch_size, pad, shape=shape)
        packed = jax.tree.map(jnp.asarray, packed)
        if sampling:
            # Filler rows (a short last batch) draw from index 0's stream; their tokens are dropped.
            idx = [indices[i] for i in rows] + [0] * (batch_size - len(rows))
            toks, lengths = generate_tokens_packed(model.params, model.config, packed, eos, max_new_tokens, pad,
                                                   row_keys(key, idx), *settings)
        else:
            toks, lengths = generate_tokens_packed(model.params, model.config, packed, eos, max_new_tokens, pad)
        toks, lengths = np.asarray(toks), np.asarray(lengths)
        results.update((i, toks[r, : lengths[r]].tolist()) for r, i in enumerate(rows))
        bar.update(len(rows))
        if start + batch_size < len(order) and interrupt.requested():
            bar.close()  # before the message the CLI prints
            interrupt.check(where=f"generation: after {start + len(rows)} of {len(order)} prompts")
    bar.close()
    return [results[i] for i in range(len(prompt_ids))]


def generate(
    model: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    chat: bool = True,
    system: str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: str | None = None,
) -> list[str]:
    """Answers to ``prompts`` (rendered with the chat template unless ``chat=False``).

    Greedy by default (``temperature=0``). ``temperature > 0`` samples from the top-p nucleus of
    ``softmax(logits / temperature)``, reproducibly for a given ``seed``: prompt i draws from
    ``fold_in(fold_in(key(seed), i), step)``, whatever the batch size. For m samples of one
    question repeat it: ``generate(model, [q] * m, temperature=1.0, seed=s)`` gives m independent
    samples, since each copy has its own index. ``progress``: a progress bar with this description.
    """
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.source}: generation from text needs a tokenizer")
    texts = chat_prompts(tok, prompts, system) if chat else list(prompts)
    prompt_ids = [tok(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    key = jax.random.key(seed) if temperature > 0 else None
    new = generate_ids(model, prompt_ids, max_new_tokens, batch_size, temperature=temperature, top_p=top_p, key=key,
                       progress=progress)
    return [tok.decode(ids, skip_special_tokens=True).strip() for ids in new]
