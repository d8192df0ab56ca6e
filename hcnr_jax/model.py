"""The decoder-only transformer (Llama, Qwen2, Qwen3, Mistral, Gemma 3) as pure functions of a param pytree.

Letters in einsums: b batch, t query position, s key position, d model dim, o/i a linear layer's
output/input dim, n query heads, k kv heads, g query heads per kv head, h head dim.

Activations stay in the parameters' dtype like transformers does; RMSNorm statistics, softmax and
the returned logits are float32.

Matmul precision: ``forward(..., precision=None)`` (the default) leaves every einsum at XLA's
default precision, on purpose: generation, evaluation and training may then use the fast path of
the accelerator (on NVIDIA GPUs a float32 matmul may run as TF32, ~10 bits of mantissa). The
statistics (``hcnr_jax.stats``) pass ``precision=jax.lax.Precision.HIGHEST``, which reaches every
einsum here, forward and backward (the transposed dots of the gradient keep it), so Fisher and
Hessian are exact float32 on every backend. With bfloat16 weights the products are exact either
way; the setting matters for float32 weights and activations.

Two hooks serve the statistics without a second copy of the model:
- ``capture=True`` returns every linear layer's input, keyed by the HF weight name
  (``model.layers.3.mlp.down_proj.weight`` -> its input ``[B, T, in]``). Layers that share an
  input (q/k/v, gate/up) return the same array.
- ``probes``: arrays added to linear outputs, keyed the same way. Their gradient is the layer's
  output gradient, which with the captured input gives per-sample weight-gradient norms.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hcnr_jax import rope
from hcnr_jax.config import ModelConfig
from hcnr_jax.params import Params

NEG_INF = float(jnp.finfo(jnp.float32).min)
Precision = jax.lax.Precision | None  # an einsum's ``precision``; None: XLA's default
# Applies one linear layer: (its params {"weight" [out, in], "bias"?}, input [B, T, in], HF weight name) -> [B, T, out].
LinearFn = Callable[[Mapping[str, jax.Array], jax.Array, str], jax.Array]


class KVCache(NamedTuple):
    """Preallocated attention key/value cache (KV cache). ``valid[b, s]`` marks slots holding a real
    (non-pad) token; ``length`` is how many slots are filled (the same for every row: batches are
    left-padded)."""

    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]
    valid: jax.Array  # [B, S] bool
    length: jax.Array  # [] int32


class Output(NamedTuple):
    logits: jax.Array | None  # [B, T, V] float32
    hidden: jax.Array  # [B, T, D] final-norm hidden states
    kv_cache: KVCache | None  # the updated KV cache (forward(kv_cache=...))
    inputs: dict[str, jax.Array]  # HF linear weight name -> input [B, T, in] (capture=True)
    # The residual stream [B, T, D] before block 0 (the embeddings) and after each block, L + 1 in
    # all, as Hugging Face's hidden_states but with the last entry before the final norm (hidden_states=True).
    states: tuple[jax.Array, ...] | None = None


def init_kv_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty KV cache of ``max_len`` slots for ``batch`` rows."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch, max_len), bool),
        length=jnp.zeros((), jnp.int32),
    )


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rms_norm_plus_one(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm: the weight is stored as w and scales by (1 + w); the product is taken in
    float32 and only then cast back (Llama casts before multiplying; bfloat16 results differ)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def _norm(cfg: ModelConfig, x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    return (rms_norm_plus_one if cfg.norm_plus_one else rms_norm)(x, p["weight"], cfg.rms_norm_eps)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def embed(params: Params, cfg: ModelConfig, input_ids: jax.Array) -> jax.Array:
    """input_ids [B, T] -> embeddings [B, T, D]; Gemma multiplies by sqrt(D), rounded to the
    parameters' dtype first as transformers does (sqrt(640) becomes 25.25 in bfloat16)."""
    w = params["model"]["embed_tokens"]["weight"]
    x = w[input_ids]
    if cfg.embed_scale:
        x = x * jnp.asarray(cfg.hidden_size**0.5, jnp.float32).astype(w.dtype)
    return x


class _Linears:
    """Applies linear layers by HF name, recording inputs and adding probes when asked."""

    def __init__(self, capture: bool, probes: Mapping[str, jax.Array] | None, precision: Precision = None):
        self.capture = capture
        self.precision = precision
        self.probes = probes or {}
        self.inputs: dict[str, jax.Array] = {}

    def __call__(self, p: Mapping[str, jax.Array], x: jax.Array, name: str) -> jax.Array:
        y = jnp.einsum("bti,oi->bto", x, p["weight"], precision=self.precision)
        if "bias" in p:
            y = y + p["bias"]
        if self.capture:
            self.inputs[name] = x
        if name in self.probes:
            y = y + self.probes[name].astype(y.dtype)
        return y


def _attention_mask(
    q_idx: jax.Array, k_idx: jax.Array, key_valid: jax.Array, window: int | None,
    segments: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """[B, T, S] bool: causal by sequence index, key not padding, inside the sliding window.

    ``segments = (q_seg [B,T], k_seg [B,S], q_pos [B,T], k_pos [B,S])`` for packed sequences: a
    query sees keys of its own segment and of segment 0 (a shared prefix), and the window is
    measured in positions, since packed neighbours are not sequence neighbours.
    """
    allowed = (k_idx[None, :] <= q_idx[:, None])[None]
    if segments is not None:
        q_seg, k_seg, q_pos, k_pos = segments
        allowed = allowed & ((k_seg[:, None, :] == q_seg[:, :, None]) | (k_seg[:, None, :] == 0))
        if window is not None:
            allowed = allowed & (k_pos[:, None, :] > q_pos[:, :, None] - window)
    elif window is not None:
        allowed = allowed & (k_idx[None, :] > q_idx[:, None] - window)[None]
    return allowed & key_valid[:, None, :]


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cfg: ModelConfig,
            precision: Precision = None) -> jax.Array:
    """q [B,T,N,H], k/v [B,S,K,H], mask [B,T,S] -> [B,T,N*H]."""
    b, t, n, h = q.shape
    g = n // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, g, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32, precision=precision)
    scale = h**-0.5 if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5
    scores = scores * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, precision=precision)
    return out.reshape(b, t, n * h)


def default_positions(attention_mask: jax.Array, kv_cache: KVCache | None = None) -> jax.Array:
    """Position of each token ``[B, T]`` = number of real tokens before it (left or right padding;
    with a KV cache, its valid slots included)."""
    prior = 0 if kv_cache is None else jnp.sum(kv_cache.valid, axis=1, dtype=jnp.int32)[:, None]
    return jnp.maximum(prior + jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


class _Pass(NamedTuple):
    """What every block of one forward pass shares (built once by `forward`)."""

    cfg: ModelConfig
    linear: LinearFn
    masks: dict[int | None, jax.Array]  # sliding window (None: global) -> attention mask [B, T, S]
    ropes: dict[bool, tuple[jax.Array, jax.Array]]  # local (sliding) layer? -> RoPE (cos, sin) of the positions
    start: jax.Array  # [] int32: the KV-cache slot of the first token (0 without a KV cache)
    precision: Precision


def _check_modes(kv_cache: KVCache | None, capture: bool, probes: Mapping[str, jax.Array] | None,
                 linear: LinearFn | None, remat: bool) -> None:
    if linear is not None and (capture or probes):
        raise ValueError("forward: a custom linear cannot also capture inputs or add probes")
    if remat and (kv_cache is not None or capture):
        raise ValueError("forward: remat is for gradients without a KV cache or captured inputs")


def _segments(segment_ids: jax.Array, positions: jax.Array, kv_cache: KVCache | None,
              start: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(q_seg [B,T], k_seg [B,S], q_pos [B,T], k_pos [B,S])`` of packed sequences (`_attention_mask`);
    with a KV cache the keys are its slots, these tokens' written at ``start`` (the others 0)."""
    if kv_cache is None:
        return segment_ids, segment_ids, positions, positions

    def slots(a: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice(jnp.zeros(kv_cache.valid.shape, jnp.int32), a.astype(jnp.int32),
                                            (0, start))

    return segment_ids, slots(segment_ids), positions, slots(positions)


def _attention_masks(cfg: ModelConfig, attention_mask: jax.Array, positions: jax.Array, kv_cache: KVCache | None,
                     segment_ids: jax.Array | None) -> tuple[dict[int | None, jax.Array], jax.Array, jax.Array]:
    """``(masks, start, key_valid)``: sliding window -> mask ``[B, T, S]`` (`_attention_mask`), the
    first token's KV-cache slot ``[]`` and the real keys ``[B, S]``. The keys are the ``T`` tokens
    themselves, or with a KV cache its ``S`` slots, these tokens written at ``start``."""
    t = attention_mask.shape[1]
    start = jnp.zeros((), jnp.int32) if kv_cache is None else kv_cache.length
    q_idx = start + jnp.arange(t, dtype=jnp.int32)
    if kv_cache is None:
        k_idx, key_valid = q_idx, attention_mask
    else:
        key_valid = jax.lax.dynamic_update_slice(kv_cache.valid, attention_mask, (0, start))
        k_idx = jnp.arange(kv_cache.valid.shape[1], dtype=jnp.int32)
    segments = None if segment_ids is None else _segments(segment_ids, positions, kv_cache, start)
    masks = {w: _attention_mask(q_idx, k_idx, key_valid, w, segments) for w in set(cfg.sliding_windows)}
    return masks, start, key_valid


_KV = tuple[jax.Array, jax.Array]  # a KV cache's stacked keys and values, [L, B, S, K, H] each


def _self_attention(s: _Pass, i: int, attn: Params, h: jax.Array, kv: _KV | None) -> tuple[jax.Array, _KV | None]:
    """Block ``i``'s attention of its normed input ``h [B, T, D]`` -> ``[B, T, D]``. With ``kv``, the
    tokens' keys and values are written into layer ``i``'s slots from ``s.start`` on and the queries
    attend over every slot; the updated ``kv`` is returned."""
    cfg, linear = s.cfg, s.linear
    b, t, _ = h.shape
    pre = f"model.layers.{i}.self_attn."
    q = linear(attn["q_proj"], h, pre + "q_proj.weight").reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = linear(attn["k_proj"], h, pre + "k_proj.weight").reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = linear(attn["v_proj"], h, pre + "v_proj.weight").reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q, k = _norm(cfg, q, attn["q_norm"]), _norm(cfg, k, attn["k_norm"])
    cos, sin = s.ropes[rope.is_local(cfg, i)]
    q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
    if kv is not None:
        # Update the stacked KV cache in place (XLA aliases it) and attend over all its slots.
        ck, cv = kv
        ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (i, 0, s.start, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (i, 0, s.start, 0, 0))
        k, v = ck[i].astype(q.dtype), cv[i].astype(q.dtype)
        kv = (ck, cv)
    o = _attend(q, k, v, s.masks[cfg.sliding_windows[i]], cfg, s.precision)
    return linear(attn["o_proj"], o, pre + "o_proj.weight"), kv


def _mlp(s: _Pass, i: int, mlp: Params, h: jax.Array) -> jax.Array:
    """Block ``i``'s gated MLP of its normed input ``h [B, T, D]`` -> ``[B, T, D]``."""
    pre = f"model.layers.{i}.mlp."
    gate = s.linear(mlp["gate_proj"], h, pre + "gate_proj.weight")
    up = s.linear(mlp["up_proj"], h, pre + "up_proj.weight")
    return s.linear(mlp["down_proj"], ACTIVATIONS[s.cfg.hidden_act](gate) * up, pre + "down_proj.weight")


def _block(s: _Pass, i: int, layer: Params, x: jax.Array, kv: _KV | None) -> tuple[jax.Array, _KV | None]:
    """Block ``i`` on the residual stream ``x [B, T, D]`` -> ``[B, T, D]`` (and the updated ``kv``)."""
    cfg = s.cfg
    o, kv = _self_attention(s, i, layer["self_attn"], _norm(cfg, x, layer["input_layernorm"]), kv)
    if cfg.sandwich_norms:  # Gemma: post_attention_layernorm normalises the attention output
        x = x + _norm(cfg, o, layer["post_attention_layernorm"])
        h = _norm(cfg, x, layer["pre_feedforward_layernorm"])
    else:  # Llama: post_attention_layernorm is the MLP's input norm
        x = x + o
        h = _norm(cfg, x, layer["post_attention_layernorm"])
    m = _mlp(s, i, layer["mlp"], h)
    return x + (_norm(cfg, m, layer["post_feedforward_layernorm"]) if cfg.sandwich_norms else m), kv


def _blocks(s: _Pass, layers: list[Params], x: jax.Array, kv: _KV | None,
            remat: bool) -> tuple[list[jax.Array], _KV | None]:
    """Every block in turn from the embeddings ``x [B, T, D]``: the residual stream before and
    after each block (L + 1 arrays ``[B, T, D]``) and the updated ``kv``."""
    states = [x]
    for i, layer in enumerate(layers):
        if remat:  # only the block's input is kept for the backward pass; the rest is recomputed there
            x = remat_call(lambda layer, x, i=i: _block(s, i, layer, x, None)[0], layer, x)
        else:
            x, kv = _block(s, i, layer, x, kv)
        states.append(x)
    return states, kv


def forward(
    params: Params,
    cfg: ModelConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    kv_cache: KVCache | None = None,
    *,
    capture: bool = False,
    probes: Mapping[str, jax.Array] | None = None,
    return_logits: bool = True,
    segment_ids: jax.Array | None = None,
    precision: Precision = None,
    hidden_states: bool = False,
    linear: LinearFn | None = None,
    remat: bool = False,
) -> Output:
    """Run the model on ``input_ids [B, T]``.

    ``attention_mask [B, T]`` (1 real, 0 padding) defaults to all ones; ``positions [B, T]`` to
    the count of real tokens before each one. With ``kv_cache``, the tokens are appended at slot
    ``kv_cache.length`` and attend to everything cached before them; the updated KV cache is returned.

    ``segment_ids [B, T]`` (int, >= 0) packs several sequences into one row: a token attends only
    to earlier tokens of its own segment and of segment 0, a prefix they share. Give explicit
    ``positions``; with a KV cache, it must be empty (earlier slots would count as segment 0).

    ``precision``: the matmul precision of every einsum (None: XLA's default; the statistics pass
    ``jax.lax.Precision.HIGHEST``, see the module doc). ``hidden_states``: also return the residual
    stream before and after every block (``Output.states``; e.g. for probes).

    ``linear``: applies every linear layer instead of the plain einsum, ``(p, x, name) -> y``
    (``p`` the layer's params, ``x [B, T, in]``; the Fisher passes one whose backward reduces the
    weight-gradient norms in place); not with ``capture`` or ``probes``. ``remat``: recompute each
    block in the backward pass (``jax.checkpoint``), so that a gradient keeps one block's
    activations live at a time, not every block's; not with a KV cache.
    """
    _check_modes(kv_cache, capture, probes, linear, remat)
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), bool)
    attention_mask = attention_mask.astype(bool)
    if positions is None:
        positions = default_positions(attention_mask, kv_cache)
    masks, start, key_valid = _attention_masks(cfg, attention_mask, positions, kv_cache, segment_ids)
    kinds = {rope.is_local(cfg, i) for i in range(cfg.num_layers)}  # local (sliding) layers have their own RoPE
    ropes = {local: rope.cos_sin(cfg, positions, local) for local in kinds}
    recorder = _Linears(capture, probes, precision)
    s = _Pass(cfg, linear or recorder, masks, ropes, start, precision)

    x = embed(params, cfg, input_ids)
    kv = None if kv_cache is None else (kv_cache.k, kv_cache.v)
    states, kv = _blocks(s, params["model"]["layers"], x, kv, remat)
    hidden = _norm(cfg, states[-1], params["model"]["norm"])
    logits = lm_head(params, cfg, hidden, precision) if return_logits else None
    new_kv_cache = None if kv is None else KVCache(*kv, key_valid, start + t)
    return Output(logits, hidden, new_kv_cache, recorder.inputs, tuple(states) if hidden_states else None)


def remat_call(fn: Callable[..., jax.Array], *args: Any) -> jax.Array:
    """``fn(*args)``, rematerialised: the backward pass keeps only ``args`` (and what ``fn`` closes
    over) and recomputes ``fn`` from them, *after* the output's cotangent has arrived.

    ``jax.checkpoint`` alone leaves the recomputation free to run as soon as its inputs exist, and
    XLA's CPU scheduler then recomputes every block early, all of their activations live together
    (measured: 2 GiB more temporaries per Llama-8B block at batch 8 x 512). Here the recomputation
    runs in a ``custom_vjp`` backward whose inputs are made to depend on the cotangent
    (``after``), a data dependence no scheduler can move. Closed-over tracers (e.g. the Fisher's
    taps) become explicit inputs through ``jax.closure_convert``, so their gradients flow."""
    converted, consts = jax.closure_convert(fn, *args)
    # The converted function takes the args, then the consts.
    return _remat(converted, len(args) - 1, *args, *consts)


def _gate(args: tuple, last: int, g: jax.Array) -> tuple:
    """``args`` with the activation (``args[last]``) and, on a CPU, the low-precision weights made
    to depend on ``g``: the CPU compiler makes float32 copies of bf16 weights, at the start unless
    they wait. Full-precision weights, and every weight on an accelerator, are left alone: adding
    zero to them costs a pass over the weights per block."""
    def gated(a: Any) -> Any:
        return after(a, g) if low_precision_on_cpu(a) else a

    return tuple(after(a, g) if i == last else jax.tree.map(gated, a) for i, a in enumerate(args))


def low_precision_on_cpu(a: Any) -> bool:
    """Whether ``a`` is a floating array narrower than float32 on the CPU backend, whose compiler
    multiplies such arrays through float32 copies it makes itself."""
    return (isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating) and jnp.finfo(a.dtype).bits < 32
            and jax.default_backend() == "cpu")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _remat(fn: Callable[..., jax.Array], last: int, *args: Any) -> jax.Array:
    # Low-precision weights wait for the activation flowing in (the last of the caller's args).
    return fn(*_gate(args, last, jax.tree.leaves(args[last])[0]))


def _remat_fwd(fn, last, *args):
    return fn(*_gate(args, last, jax.tree.leaves(args[last])[0])), args


def _remat_bwd(fn, last, args, g):
    _, vjp = jax.vjp(fn, *_gate(args, last, g))
    return vjp(g)


def after(tree: Any, g: jax.Array) -> Any:
    """``tree`` with every floating leaf made to depend on all of ``g``: plus ``0 * sum(g)`` (exactly 0
    for a finite ``g``). XLA removes ``optimization_barrier`` before the CPU backend schedules (then
    every block's recomputation ran before the first block's backward); an arithmetic dependence
    survives every pass. A sum, not one element, so that no pass can slice ``g``'s producer down
    to the element. Added where a leaf is used, so it fuses into the consumer."""
    zero = jnp.sum(g, dtype=jnp.float32) * 0

    def dep(a: Any) -> Any:
        if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating):
            return a + zero.astype(a.dtype)
        return a

    return jax.tree.map(dep, tree)


_remat.defvjp(_remat_fwd, _remat_bwd)


def lm_head(params: Params, cfg: ModelConfig, hidden: jax.Array, precision: Precision = None) -> jax.Array:
    """hidden [B, T, D] -> float32 logits [B, T, V] (tied embeddings when the config says so;
    Gemma's final soft-capping when the config sets it)."""
    return head_logits(head_weight(params, cfg), cfg, hidden, precision)


def head_weight(params: Params, cfg: ModelConfig) -> jax.Array:
    """The LM head's weight ``[V, D]``: the embeddings when they are tied."""
    return params["model"]["embed_tokens"]["weight"] if cfg.tie_word_embeddings else params["lm_head"]["weight"]


def head_logits(w: jax.Array, cfg: ModelConfig, hidden: jax.Array, precision: Precision = None) -> jax.Array:
    """``lm_head`` with its weight ``w [V, D]`` given: hidden [B, T, D] -> float32 logits [B, T, V]."""
    logits = jnp.einsum("btd,vd->btv", hidden, w, preferred_element_type=jnp.float32, precision=precision)
    return _softcap(logits, cfg.final_logit_softcapping)
