"""The parameter pytree and its one-to-one naming with Hugging Face tensors.

Parameters live in HF weight space with HF names: a nested dict whose key path, joined by '.',
is the HF tensor name (``params["model"]["layers"][3]["mlp"]["down_proj"]["weight"]`` is
``model.layers.3.mlp.down_proj.weight``). Linear weights keep the HF ``[out, in]`` layout, so an
input neuron (docs/method.md's column ``W[:, k]``) is ``weight[:, k]`` and conversion is a rename only.
"""

from __future__ import annotations

from typing import Any

import jax

from hcnr_jax.config import ModelConfig

Params = dict[str, Any]

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
# Linear layers of one block that read the same input: their X^T X is the same matrix.
SHARED_INPUT = {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "gate_proj": "gate_proj",
                "up_proj": "gate_proj"}


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of each linear layer of one transformer block, keyed by HF module path."""
    d, q, kv, f = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    return {
        "self_attn.q_proj": (q, d),
        "self_attn.k_proj": (kv, d),
        "self_attn.v_proj": (kv, d),
        "self_attn.o_proj": (d, q),
        "mlp.gate_proj": (f, d),
        "mlp.up_proj": (f, d),
        "mlp.down_proj": (d, f),
    }


def param_specs(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model has, HF name -> shape, in canonical order."""
    specs: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for module, shape in linear_shapes(cfg).items():
            specs[p + module + ".weight"] = shape
            name = module.split(".")[1]
            has_bias = (cfg.qkv_bias and name in ("q_proj", "k_proj", "v_proj")) or (
                cfg.o_bias and name == "o_proj") or (cfg.mlp_bias and name in MLP_PROJ)
            if has_bias:
                specs[p + module + ".bias"] = (shape[0],)
        if cfg.qk_norm:
            specs[p + "self_attn.q_norm.weight"] = (cfg.head_dim,)
            specs[p + "self_attn.k_norm.weight"] = (cfg.head_dim,)
        specs[p + "input_layernorm.weight"] = (cfg.hidden_size,)
        specs[p + "post_attention_layernorm.weight"] = (cfg.hidden_size,)
        if cfg.sandwich_norms:
            specs[p + "pre_feedforward_layernorm.weight"] = (cfg.hidden_size,)
            specs[p + "post_feedforward_layernorm.weight"] = (cfg.hidden_size,)
    specs["model.norm.weight"] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        specs["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return specs


def linear_names(cfg: ModelConfig) -> list[str]:
    """HF names of every linear weight of the transformer blocks (what HCNR may modify)."""
    return [f"model.layers.{i}.{m}.weight" for i in range(cfg.num_layers) for m in linear_shapes(cfg)]


def unflatten(flat: dict[str, Any], num_layers: int) -> Params:
    """HF-named flat dict -> nested pytree (``model.layers`` becomes a list of ``num_layers``)."""
    tree: Params = {"model": {"layers": [{} for _ in range(num_layers)]}}
    for name, value in flat.items():
        parts = name.split(".")
        node: Any = tree
        for key in parts[:-1]:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[parts[-1]] = value
    return tree


def _key_str(k: Any) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    return str(k)


def hf_name(path: tuple[Any, ...]) -> str:
    """JAX key path of a leaf -> its HF tensor name."""
    return ".".join(_key_str(k) for k in path)


def flatten(params: Params) -> dict[str, Any]:
    """Nested pytree -> HF-named flat dict (same leaves, no copies)."""
    return {hf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def get(params: Params, name: str) -> Any:
    node: Any = params
    for key in name.split("."):
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def set_leaves(params: Params, updates: dict[str, Any]) -> Params:
    """A new pytree with the named leaves replaced; ``params`` is not modified."""
    flat = flatten(params)
    unknown = set(updates) - set(flat)
    if unknown:
        raise KeyError(f"no such tensors: {sorted(unknown)[:5]}")
    flat.update(updates)
    return unflatten(flat, len(params["model"]["layers"]))
