"""hcnr-jax: training-free honesty repair of fine-tuned LLMs (HCNR) in JAX."""

# `hcnr_jax.repair(...)` runs a repair; the package is callable (hcnr_jax/repair/__init__.py).
from hcnr_jax import repair
from hcnr_jax.config import ModelConfig, config_from_hf
from hcnr_jax.errors import CheckpointError, DataError, HcnrError
from hcnr_jax.generation import generate
from hcnr_jax.pretrained import Pretrained, load_pretrained, logits, save_pretrained
from hcnr_jax.repair import RepairConfig
from hcnr_jax.source import ModelSource

__all__ = [
    "CheckpointError",
    "DataError",
    "HcnrError",
    "ModelConfig",
    "ModelSource",
    "Pretrained",
    "RepairConfig",
    "config_from_hf",
    "generate",
    "load_pretrained",
    "logits",
    "repair",
    "save_pretrained",
]
__version__ = "0.1.0"
