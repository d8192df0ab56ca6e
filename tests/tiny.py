"""Tiny random Hugging Face models of every family, configured to exercise its features.

Shapes are deliberately awkward: heads x head_dim != hidden, kv heads != heads, sizes not
powers of two, so that transposes and reshapes that happen to work on square shapes fail here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3")

BASE = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=72,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=12,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Per family: the features its released checkpoints use.
FEATURES: dict[str, dict[str, Any]] = {
    # Llama 3.1 RoPE scaling, tied embeddings (as small Llama 3.2 / SmolLM2 ship).
    "llama": dict(
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64),
        tie_word_embeddings=True,
    ),
    # q/k/v biases, YaRN scaling, sliding window on the upper layers.
    "qwen2": dict(
        rope_parameters=dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0,
                             original_max_position_embeddings=64),
        max_position_embeddings=256, use_sliding_window=True, sliding_window=7, max_window_layers=1,
        tie_word_embeddings=False,
    ),
    # q/k norms, attention bias off, tied embeddings.
    "qwen3": dict(rope_parameters=dict(rope_type="default", rope_theta=1000000.0), tie_word_embeddings=True),
    # Sliding window on every layer, linear RoPE scaling.
    "mistral": dict(
        sliding_window=5, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
        tie_word_embeddings=False,
    ),
    # Gemma 3: sliding and global layers with their own RoPE (linear scaling on the global ones),
    # query_pre_attn_scalar != head_dim, final soft-capping low enough to bite, an attention bias.
    # attn_logit_softcapping stays unset: transformers' Gemma3Attention never applies it.
    "gemma3": dict(
        sliding_window_pattern=2, sliding_window=5,  # sliding, global, sliding, ... at any depth
        rope_parameters=dict(full_attention=dict(rope_type="linear", rope_theta=100000.0, factor=4.0),
                             sliding_attention=dict(rope_type="default", rope_theta=10000.0)),
        query_pre_attn_scalar=20, final_logit_softcapping=0.5,
        hidden_activation="gelu_pytorch_tanh", attention_bias=True, tie_word_embeddings=True,
    ),
}


def hf_config(family: str, **overrides: Any) -> Any:
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig,
           "gemma3": transformers.Gemma3TextConfig}[family]
    return cls(**{**BASE, **FEATURES[family], **overrides})


def hf_model(family: str, seed: int = 0, dtype: Any = None, **overrides: Any) -> Any:
    """A random transformers CausalLM of ``family`` (float32 unless ``dtype``)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides))
    # Non-trivial norms and biases: the defaults (ones, zeros) would hide a missing multiply/add.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def save_hf(model: Any, path: Path, **kwargs: Any) -> Path:
    model.save_pretrained(str(path), **kwargs)
    return path
