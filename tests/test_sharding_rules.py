"""Sharding by role on 8 simulated CPU devices: the ``.sharding.spec`` of weights, LoRA factors,
optimizer states, activations (compiled output shardings) and statistics, and the warning for a
weight that cannot be split. One subprocess runs every check and reports the specs as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hcnr_jax.sharding import ShardingRules, role_of

WORKER = textwrap.dedent("""
    import json, logging, sys
    sys.path.insert(0, {tests!r})
    import jax, jax.numpy as jnp, numpy as np, optax
    import tiny
    from functools import partial
    from hcnr_jax import sharding, stats
    from hcnr_jax.config import config_from_hf
    from hcnr_jax.model import forward
    from hcnr_jax.params import flatten, param_specs, unflatten
    from hcnr_jax.stats import engine, fisher_accum, hessian_accum
    from hcnr_jax.train.lora import init_adapter

    def spec(s):  # PartitionSpec -> list, trailing Nones dropped (P('data') == P('data', None))
        out = [a for a in s.spec]
        while out and out[-1] is None:
            out.pop()
        return out

    def config(vocab):
        return config_from_hf({{**tiny.BASE, **tiny.FEATURES["qwen2"], "model_type": "qwen2",
                                "num_hidden_layers": 2, "vocab_size": vocab}})

    def params_of(cfg):
        rng = np.random.default_rng(0)
        return unflatten({{k: rng.normal(size=s).astype(np.float32) * 0.1 for k, s in param_specs(cfg).items()}},
                         cfg.num_layers)

    out = {{}}
    cfg = config(96)
    params = params_of(cfg)
    mesh = sharding.make_mesh("data=2,model=4")
    for fsdp in (False, True):
        sh = sharding.param_shardings(params, mesh, fsdp=fsdp)
        out[f"params_fsdp={{fsdp}}"] = {{k: spec(v) for k, v in flatten(sh).items()}}
        by_name = sharding.tensor_shardings(param_specs(cfg), mesh, fsdp=fsdp)
        out[f"by_name_fsdp={{fsdp}}"] = {{k: spec(v) for k, v in by_name.items()}}
        out[f"by_name_equal_fsdp={{fsdp}}"] = all(by_name[k] == v for k, v in flatten(sh).items())
    placed = sharding.put_tree(params, sharding.param_shardings(params, mesh))
    out["placed"] = {{k: spec(v.sharding) for k, v in flatten(placed).items()}}

    # Gemma 3: its four norms per block, q/k norms and tied embeddings all have roles (no debug log).
    gcfg = config_from_hf({{**tiny.BASE, **tiny.FEATURES["gemma3"], "model_type": "gemma3_text",
                            "num_hidden_layers": 2, "vocab_size": 96}})
    logger = logging.getLogger("hcnr_jax.sharding")
    logger.setLevel(logging.DEBUG)
    grecords = []
    handler = logging.Handler()
    handler.emit = lambda r: grecords.append(r.getMessage())
    logger.addHandler(handler)
    out["gemma3"] = {{k: spec(v) for k, v in sharding.tensor_shardings(param_specs(gcfg), mesh).items()}}
    out["gemma3_log"] = list(grecords)
    logger.removeHandler(handler)

    adapter = init_adapter(jax.random.key(0), params, cfg, 8, ("q_proj", "down_proj"))
    out["lora"] = {{k + "." + ab: spec(s) for k, d in sharding.param_shardings(adapter, mesh).items()
                   for ab, s in d.items()}}
    opt_state = optax.adam(1e-3).init(params)
    logger = logging.getLogger("hcnr_jax.sharding")
    logger.setLevel(logging.DEBUG)
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append((r.levelname, r.getMessage()))
    logger.addHandler(handler)
    opt_sh = sharding.param_shardings(opt_state, mesh)
    mu = opt_sh[0].mu
    out["opt"] = {{"count": spec(opt_sh[0].count), "mu_down": spec(mu["model"]["layers"][1]["mlp"]["down_proj"]["weight"]),
                  "nu_q": spec(opt_sh[0].nu["model"]["layers"][0]["self_attn"]["q_proj"]["weight"])}}
    out["opt_log"] = list(records)

    # Activations: XLA propagates the weights' shardings through the model.
    ids = sharding.put(np.ones((4, 9), np.int32), sharding.batch_sharding(mesh))
    def acts(p, i):
        o = forward(p, cfg, i, capture=True)
        x = o.inputs
        return {{"q_in": x["model.layers.0.self_attn.q_proj.weight"], "o_in": x["model.layers.0.self_attn.o_proj.weight"],
                "down_in": x["model.layers.1.mlp.down_proj.weight"], "hidden": o.hidden, "logits": o.logits}}
    compiled = jax.jit(acts).lower(placed, ids).compile()
    out["activations"] = {{k: spec(v) for k, v in compiled.output_shardings.items()}}

    # Statistics: the engine's step output (one real batch) and host results equal across meshes.
    batch = {{"input_ids": np.arange(36, dtype=np.int32).reshape(4, 9) % 96,
              "attention_mask": np.ones((4, 9), bool), "loss_mask": np.ones((4, 9), bool)}}
    for kind in ("fisher_input", "fisher_output", "hessian"):
        if kind.startswith("fisher"):
            axis = kind.split("_")[1]
            init = partial(fisher_accum.init, cfg=cfg, neuron_axis=axis)
            update, opts = stats.fisher_update, {{"neuron_axis": axis, "backend": "auto", "max_targets": 8}}
        else:
            init, update, opts = partial(hessian_accum.init, cfg=cfg), stats.hessian_update, {{"backend": "auto"}}
        state0 = jax.eval_shape(init, params)
        step, state_sh, param_sh, batch_sh = engine.step_and_shardings(
            update, cfg, opts, mesh, False, state0, params)
        state = jax.tree.map(lambda s, sh: sharding.put(np.zeros(s.shape, s.dtype), sh), state0, state_sh)
        res = step(state, sharding.put_tree(params, param_sh), {{k: sharding.put(v, batch_sh) for k, v in batch.items()}})
        out[kind] = {{k: spec(v.sharding) for k, v in res.items()}}

    # A vocabulary of 97 cannot be split over model=4: a warning names the tensors.
    records.clear()
    bad = sharding.param_shardings(params_of(config(97)), mesh)
    out["unsplit"] = {{"embed": spec(bad["model"]["embed_tokens"]["weight"]), "log": list(records)}}
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    script = tmp_path_factory.mktemp("sharding") / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


L0 = "model.layers.0."


def test_weights_by_role(specs):
    p = specs["params_fsdp=False"]
    for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert p[L0 + m + ".weight"] == ["model"], m  # split over the output dimension
    for m in ("self_attn.o_proj", "mlp.down_proj"):
        assert p[L0 + m + ".weight"] == [None, "model"], m  # split over the input dimension
    assert p[L0 + "self_attn.q_proj.bias"] == ["model"]
    assert p["model.embed_tokens.weight"] == p["lm_head.weight"] == ["model"]  # vocabulary
    assert p["model.norm.weight"] == p[L0 + "input_layernorm.weight"] == []
    assert specs["placed"] == p  # device_put honours them
    f = specs["params_fsdp=True"]
    assert f[L0 + "self_attn.q_proj.weight"] == ["model", "data"]
    assert f[L0 + "mlp.down_proj.weight"] == ["data", "model"]
    assert f["model.norm.weight"] == []
    for fsdp in (False, True):  # from names and shapes alone (for loading), the same shardings
        assert specs[f"by_name_fsdp={fsdp}"] == specs[f"params_fsdp={fsdp}"]
        assert specs[f"by_name_equal_fsdp={fsdp}"]


def test_gemma3_weights_by_role(specs):
    g = specs["gemma3"]
    assert specs["gemma3_log"] == []  # every tensor had a role
    for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
        assert g[L0 + norm + ".weight"] == [], norm
    assert g[L0 + "self_attn.q_proj.weight"] == g[L0 + "mlp.gate_proj.weight"] == ["model"]
    assert g[L0 + "mlp.down_proj.weight"] == [None, "model"]
    assert g["model.embed_tokens.weight"] == ["model"] and "lm_head.weight" not in g  # tied


def test_lora_and_optimizer_states(specs):
    lora = specs["lora"]
    assert lora[L0 + "self_attn.q_proj.A"] == [] and lora[L0 + "self_attn.q_proj.B"] == ["model"]
    assert lora[L0 + "mlp.down_proj.A"] == [None, "model"] and lora[L0 + "mlp.down_proj.B"] == []
    opt = specs["opt"]
    assert opt["mu_down"] == [None, "model"] and opt["nu_q"] == ["model"] and opt["count"] == []
    levels = {lvl for lvl, _ in specs["opt_log"]}
    assert levels == {"DEBUG"}, specs["opt_log"]  # unknown roles (the step count): debug, not warning
    assert any("count" in msg for _, msg in specs["opt_log"])


def test_activations_follow_the_weights(specs):
    rules = ShardingRules()
    a = specs["activations"]
    assert a["down_in"] == list(rules.spec("batch", "seq", "act_ffw")) == ["data", None, "model"]
    assert a["o_in"] == ["data", None, "model"]  # attention output: heads over model
    assert a["q_in"] == a["hidden"] == ["data"]  # residual stream: replicated over model
    assert a["logits"] == ["data", None, "model"]  # vocabulary over model


def test_statistics_follow_their_weights_neuron_axis(specs):
    fin, fout, h = specs["fisher_input"], specs["fisher_output"], specs["hessian"]
    assert fin[L0 + "mlp.down_proj.weight"] == ["model"] and fin[L0 + "self_attn.o_proj.weight"] == ["model"]
    assert fin[L0 + "self_attn.q_proj.weight"] == []  # input = hidden: not split
    assert fout[L0 + "self_attn.q_proj.weight"] == ["model"] and fout[L0 + "mlp.down_proj.weight"] == []
    assert h[L0 + "mlp.down_proj.weight"] == ["model"]
    # q's input (the residual stream) is replicated: its Hessian's rows are split all the same.
    assert h[L0 + "self_attn.q_proj.weight"] == list(ShardingRules().spec("hessian_rows")) == ["model"]


def test_unsplittable_weight_warns_by_name(specs):
    u = specs["unsplit"]
    assert u["embed"] == []
    warnings = [msg for lvl, msg in u["log"] if lvl == "WARNING"]
    assert len(warnings) == 1 and "model.embed_tokens.weight" in warnings[0] and "lm_head.weight" in warnings[0]
    assert "97" in warnings[0] and "model=4" in warnings[0]


def test_roles_of_names():
    assert role_of("model.layers.3.mlp.down_proj.weight") == ("down_proj", ("embed", "ffw"))
    assert role_of("0.mu.model.layers.3.self_attn.k_proj.bias") == ("k_proj", ("kv_heads",))
    assert role_of("model.layers.3.mlp.up_proj.A") == ("up_proj", ("lora_rank", "embed"))
    assert role_of("model.layers.3.self_attn.q_norm.weight") == ("norm", ("norm",))
    assert role_of("model.layers.3.pre_feedforward_layernorm.weight") == ("norm", ("norm",))
    assert role_of("model.layers.3.post_feedforward_layernorm.weight") == ("norm", ("norm",))
    assert role_of("0.count") is None
