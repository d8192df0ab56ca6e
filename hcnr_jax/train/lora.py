"""LoRA as a pure function of two pytrees: the frozen base params and the adapter.

The adapter is ``{module: {"A": [r, in], "B": [out, r]}}`` keyed by HF module name
(``model.layers.3.mlp.down_proj``), PEFT's layout and naming, so saving it is a rename
(``conversion.lora.write_adapter``). ``merged`` forms ``W + s * B @ A`` inside the jitted loss: the
model code is the project's one ``forward``, and for r << in, out the extra work per step is
small next to the forward pass. Initialisation is PEFT's default: A Kaiming-uniform
(``a = sqrt(5)``, i.e. U(-1/sqrt(in), 1/sqrt(in))), B zero, so training starts at the base model.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from hcnr_jax.config import ModelConfig
from hcnr_jax.params import Params, get, linear_shapes, set_leaves
from hcnr_jax.precision import HIGHEST

Adapter = dict[str, dict[str, jax.Array]]


def lora_modules(cfg: ModelConfig, targets: Sequence[str]) -> list[str]:
    """HF module names of every linear layer whose short name (``q_proj``, ...) is in ``targets``."""
    return [f"model.layers.{i}.{m}" for i in range(cfg.num_layers) for m in linear_shapes(cfg)
            if m.split(".")[1] in targets]


def init_adapter(key: jax.Array, params: Params, cfg: ModelConfig, rank: int, targets: Sequence[str]) -> Adapter:
    """A fresh float32 adapter (B = 0: the adapted model equals the base)."""
    adapter: Adapter = {}
    for i, module in enumerate(lora_modules(cfg, targets)):
        out_dim, in_dim = get(params, module + ".weight").shape
        bound = 1.0 / in_dim**0.5
        a = jax.random.uniform(jax.random.fold_in(key, i), (rank, in_dim), jnp.float32, -bound, bound)
        adapter[module] = {"A": a, "B": jnp.zeros((out_dim, rank), jnp.float32)}
    return adapter


def merged(params: Params, adapter: Adapter, scaling: float) -> Params:
    """``params`` with ``W + scaling * B @ A`` for every adapted module (float32 math, cast once to
    W's dtype, as ``conversion.lora.merge_weight`` does when an adapter is loaded)."""
    updates = {}
    for module, ab in adapter.items():
        w = get(params, module + ".weight")
        delta = jnp.matmul(ab["B"].astype(jnp.float32), ab["A"].astype(jnp.float32),
                           precision=HIGHEST)
        updates[module + ".weight"] = (w.astype(jnp.float32) + scaling * delta).astype(w.dtype)
    return set_leaves(params, updates)


def num_params(adapter: Adapter) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(adapter))
