"""hcnr-jax: training-free honesty repair of fine-tuned LLMs (HCNR) in JAX."""

from hcnr_jax.config import ModelConfig, config_from_hf
from hcnr_jax.errors import CheckpointError, DataError, HcnrError
from hcnr_jax.pretrained import Pretrained, load_pretrained, logits, save_pretrained

__all__ = [
    "CheckpointError",
    "DataError",
    "HcnrError",
    "ModelConfig",
    "Pretrained",
    "config_from_hf",
    "load_pretrained",
    "logits",
    "save_pretrained",
]
__version__ = "0.1.0"
