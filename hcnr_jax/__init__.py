"""hcnr-jax: training-free honesty repair of fine-tuned LLMs (HCNR) in JAX."""

from hcnr_jax.config import ModelConfig, config_from_hf
from hcnr_jax.errors import CheckpointError, DataError, HcnrError
from hcnr_jax.generation import generate
from hcnr_jax.pretrained import Pretrained, load_pretrained, logits, save_pretrained
from hcnr_jax.repair import RepairConfig

# `hcnr_jax.repair(...)` is the repair function itself (`help` shows its signature). It takes the
# attribute name of the subpackage hcnr_jax/repair/, whose modules are still imported by name
# (`from hcnr_jax.repair.solvers import ...` finds them in sys.modules, not through this attribute;
# `import hcnr_jax.repair.solvers as s` would look through it, so write the `from` form).
from hcnr_jax.repair.pipeline import repair
from hcnr_jax.source import ModelSource
from hcnr_jax.stats import StatsOptions

__all__ = [
    "CheckpointError",
    "DataError",
    "HcnrError",
    "ModelConfig",
    "ModelSource",
    "Pretrained",
    "RepairConfig",
    "StatsOptions",
    "config_from_hf",
    "generate",
    "load_pretrained",
    "logits",
    "repair",
    "save_pretrained",
]
__version__ = "0.1.0"
