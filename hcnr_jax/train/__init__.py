"""Training in JAX: SFT, DPO and ORPO, full or LoRA, on the project's own ``forward``.

- ``config.TrainConfig``: the settings (YAML + flags through ``hcnr train``).
- ``losses``: the objectives, float32, stable (no NaN for finite inputs).
- ``lora``: adapters as a pytree beside the frozen base; saved in PEFT's format.
- ``loop.train``: optax, gradient accumulation, data parallelism over a mesh, orbax resume.
- ``model_answers``: a model's greedy and sampled answers for the honesty-data recipes (the recipes
  themselves: ``hcnr_jax.data.recipes``).
"""

from hcnr_jax.train.config import TrainConfig, load_train_config
from hcnr_jax.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "load_train_config", "train"]
