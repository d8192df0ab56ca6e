"""Full-size configs of released checkpoints: parsed, shaped and traced at no cost (jax.eval_shape)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hcnr_jax.config import config_from_hf
from hcnr_jax.errors import CheckpointError
from hcnr_jax.model import forward
from hcnr_jax.params import param_specs, unflatten

# config.json fields of released checkpoints (as published on their model cards), and their
# published parameter counts.
PRESETS = {
    "Llama-3.1-8B-Instruct": (dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192, rope_type="llama3")), 8_030_261_248),
    "Qwen2.5-7B-Instruct": (dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=32768,
        rope_theta=1000000.0, sliding_window=131072, use_sliding_window=False, max_window_layers=28,
        tie_word_embeddings=False, rope_scaling=None), 7_615_616_512),
    "Qwen3-8B": (dict(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
        max_position_embeddings=40960, rope_theta=1000000.0, attention_bias=False, tie_word_embeddings=False,
        use_sliding_window=False, sliding_window=None, max_window_layers=36), 8_190_735_360),
    "Mistral-7B-v0.1": (dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=32768,
        rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False), 7_241_732_096),
    "SmolLM2-135M-Instruct": (dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, max_position_embeddings=8192,
        rope_theta=100000.0, tie_word_embeddings=True), 134_515_008),
    # The pre-transformers-5 spelling (rope_theta + rope_local_base_freq, sliding_window_pattern).
    "gemma-3-270m": (dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, rms_norm_eps=1e-6, max_position_embeddings=32768,
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, rope_theta=1000000.0,
        rope_local_base_freq=10000.0, rope_scaling=None, sliding_window=512, sliding_window_pattern=6,
        attn_logit_softcapping=None, final_logit_softcapping=None, attention_bias=False), 268_098_176),
}


@pytest.mark.parametrize("name", PRESETS)
def test_full_size_preset_traces(name):
    hf, n_params = PRESETS[name]
    cfg = config_from_hf(hf, source=name)
    specs = param_specs(cfg)
    assert sum(int(np.prod(s)) for s in specs.values()) == n_params
    params = unflatten({k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, s in specs.items()}, cfg.num_layers)
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    out = jax.eval_shape(lambda p, i: forward(p, cfg, i, capture=True), params, ids)
    assert out.logits.shape == (2, 16, cfg.vocab_size) and out.logits.dtype == jnp.float32
    assert len(out.inputs) == 7 * cfg.num_layers
    assert out.inputs["model.layers.0.mlp.down_proj.weight"].shape == (2, 16, cfg.intermediate_size)


def test_sliding_window_resolution():
    base = PRESETS["Qwen3-8B"][0]
    assert config_from_hf(base).sliding_windows == (None,) * 36
    cfg = config_from_hf({**base, "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 30})
    assert cfg.sliding_windows == (None,) * 30 + (4096,) * 6
    assert config_from_hf(PRESETS["Mistral-7B-v0.1"][0]).sliding_windows == (4096,) * 32


def test_gemma3_layer_types_and_ropes():
    """Every 6th layer global with rope_theta (and rope_scaling), the others sliding with their own base;
    transformers-5's per-layer-type rope_parameters give the same config."""
    legacy = {**PRESETS["gemma-3-270m"][0], "rope_scaling": dict(rope_type="linear", factor=8.0)}
    cfg = config_from_hf(legacy)
    assert cfg.sliding_windows == ((512,) * 5 + (None,)) * 3
    assert (cfg.rope_theta, cfg.rope_type, cfg.rope_params, cfg.local_rope_theta) == (1e6, "linear", {"factor": 8.0}, 1e4)
    assert cfg.tie_word_embeddings and cfg.query_pre_attn_scalar == 256 and cfg.final_logit_softcapping is None
    new = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling",
                                                      "sliding_window_pattern")}
    new["layer_types"] = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)]
    new["rope_parameters"] = dict(full_attention=dict(rope_type="linear", rope_theta=1e6, factor=8.0),
                                  sliding_attention=dict(rope_type="default", rope_theta=1e4))
    assert config_from_hf(new) == cfg
    with pytest.raises(CheckpointError, match="hidden_activation"):
        config_from_hf({**legacy, "hidden_activation": "gelu"})
    with pytest.raises(CheckpointError, match="sliding layers"):
        config_from_hf({**new, "rope_parameters": {**new["rope_parameters"], "sliding_attention": dict(
            rope_type="linear", rope_theta=1e4, factor=2.0)}})
    with pytest.raises(CheckpointError, match="per-layer-type"):
        config_from_hf({**PRESETS["Qwen3-8B"][0], "rope_parameters": new["rope_parameters"]})


def test_config_is_a_static_jit_argument():
    a = config_from_hf(PRESETS["SmolLM2-135M-Instruct"][0])
    b = config_from_hf(dict(PRESETS["SmolLM2-135M-Instruct"][0]))
    assert a == b and hash(a) == hash(b)
