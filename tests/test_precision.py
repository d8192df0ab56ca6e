"""precision=HIGHEST reaches every dot of the statistics and solver programs (lowered and compiled),
while the model's default (inference) path keeps XLA's default precision."""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import pytest
import tiny

from hcnr_jax import sharding, stats
from hcnr_jax.config import config_from_hf
from hcnr_jax.model import forward
from hcnr_jax.params import param_specs, unflatten
from hcnr_jax.stats import engine, fisher_accum, hessian_accum


def tiny_config(family: str, layers: int = 2):
    """A tiny ModelConfig of ``family`` without building a transformers model."""
    return config_from_hf({**tiny.BASE, **tiny.FEATURES[family], "model_type": family, "num_hidden_layers": layers})


def abstract_params(cfg, dtype=jnp.float32):
    return unflatten({k: jax.ShapeDtypeStruct(s, dtype) for k, s in param_specs(cfg).items()}, cfg.num_layers)


def dots(text: str) -> list[str]:
    return re.findall(r"stablehlo\.dot_general[^\n]*", text)


def compiled_dots(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(r"\bdot\(", line)]


def lower_step(kind: str, cfg, neuron_axis: str = "input"):
    params = abstract_params(cfg)
    if kind == "fisher":
        init = partial(fisher_accum.init, cfg=cfg, neuron_axis=neuron_axis)
        update, opts = stats.fisher_update, {"neuron_axis": neuron_axis, "backend": "auto", "max_targets": 7}
    else:
        init = partial(hessian_accum.init, cfg=cfg)
        update, opts = stats.hessian_update, {"backend": "auto"}
    mesh = sharding.make_mesh("data=1", jax.devices()[:1])
    state = jax.eval_shape(init, params)
    step, *_ = engine.step_and_shardings(
        update, cfg, opts, mesh, False, state, params)
    batch = {k: jax.ShapeDtypeStruct((3, 11), jnp.int32 if k == "input_ids" else jnp.bool_)
             for k in ("input_ids", "attention_mask", "loss_mask")}
    return step.lower(state, params, batch)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("kind", ["fisher", "hessian"])
def test_statistics_steps_lower_with_highest(family, kind):
    found = dots(lower_step(kind, tiny_config(family)).as_text())
    # Fisher: forward + backward of 7 linears x 2 layers, attention, LM head, ghost norms.
    assert len(found) >= (40 if kind == "fisher" else 20)
    bad = [d for d in found if "precision = [HIGHEST, HIGHEST]" not in d]
    assert not bad, bad[:3]


def test_compiled_hlo_keeps_highest():
    lowered = lower_step("fisher", tiny_config("llama"), neuron_axis="output")
    found = compiled_dots(lowered.compile().as_text())
    assert found
    bad = [d for d in found if "operand_precision={highest,highest}" not in d]
    assert not bad, bad[:3]


def test_inference_path_keeps_default_precision():
    """The check above can fail: forward without ``precision`` lowers DEFAULT dots."""
    cfg = tiny_config("llama")
    ids = jax.ShapeDtypeStruct((2, 5), jnp.int32)
    found = dots(jax.jit(lambda p, i: forward(p, cfg, i).logits).lower(abstract_params(cfg), ids).as_text())
    assert found and all("precision = [DEFAULT, DEFAULT]" in d or "precision" not in d for d in found)
    high = dots(jax.jit(lambda p, i: forward(p, cfg, i, precision=jax.lax.Precision.HIGHEST).logits)
                .lower(abstract_params(cfg), ids).as_text())
    assert len(high) == len(found) and all("precision = [HIGHEST, HIGHEST]" in d for d in high)


@pytest.mark.parametrize("solver", ["exact", "paper", "cg"])
def test_solver_programs_lower_with_highest(solver):
    from hcnr_jax.plan import solve_program

    out, inp, hc = 6, 10, 4
    f32 = jnp.float32
    args = (jax.ShapeDtypeStruct((out, inp), f32), jax.ShapeDtypeStruct((out, inp), f32),
            jax.ShapeDtypeStruct((inp, inp), f32), jax.ShapeDtypeStruct((hc,), jnp.int32),
            jax.ShapeDtypeStruct((inp - hc,), jnp.int32), jax.ShapeDtypeStruct((), f32))
    found = dots(solve_program(solver, out, inp, hc).lower(*args).as_text())
    assert found
    bad = [d for d in found if "precision = [HIGHEST, HIGHEST]" not in d]
    assert not bad, bad[:3]
