"""`TrainConfig`: every setting of one training run (`hcnr train`), defaults <- YAML <- flags.

Defaults are ours, chosen for LoRA on small instruct models on a CPU; the "Alignment for Honesty"
recipes (AdamW, lr 1e-6 full fine-tuning, weight decay 0.1, warm-up 0.05, batch 8) are one YAML
file away (``configs/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hcnr_jax.errors import HcnrError
from hcnr_jax.settings import Settings

OBJECTIVES = ("sft", "dpo", "orpo")
METHODS = ("lora", "full")
SCHEDULES = ("cosine", "linear", "constant")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainConfig(Settings):
    """Settings of one run.

    - ``objective``: ``sft`` on ``{prompt, response}`` (token-mean NLL of the assistant turn), ``dpo``
      or ``orpo`` on ``{prompt, chosen, rejected}``.
    - ``method``: ``lora`` (rank ``lora_rank``, scaling ``lora_alpha / lora_rank``, on the linear
      layers named in ``lora_targets``) or ``full`` (every parameter).
    - ``learning_rate``, ``weight_decay`` (AdamW), ``warmup_ratio`` and ``schedule`` (of the
      learning rate over all steps), ``max_grad_norm`` (global clipping; 0 disables).
    - ``epochs`` (may be fractional) or ``max_steps`` (wins when set); one optimizer step sees
      ``batch_size * grad_accum`` samples.
    - ``beta``: DPO's KL strength; ``orpo_lambda``: weight of ORPO's odds-ratio term.
    - ``max_length``: tokens per sample (cut on the right); ``limit``: use the first N samples.
    - ``checkpoint_every``: optimizer steps between orbax checkpoints (0: none); ``seed``: LoRA
      initialisation and data order.
    """

    objective: str = "sft"
    method: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    beta: float = 0.1
    orpo_lambda: float = 0.1
    max_length: int = 256
    limit: int | None = None
    checkpoint_every: int = 50
    seed: int = 0

    def validate(self) -> TrainConfig:
        """Raise `HcnrError` naming the field for any setting out of range; return self."""
        for name, allowed in (("objective", OBJECTIVES), ("method", METHODS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise HcnrError(f"{name}={getattr(self, name)!r}: choose one of {list(allowed)}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad or not self.lora_targets:
            raise HcnrError(f"lora_targets={list(self.lora_targets)!r}: choose from {list(LORA_TARGETS)}")
        for name in ("lora_rank", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise HcnrError(f"{name}={getattr(self, name)!r}: must be a positive integer")
        for name in ("max_steps", "limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise HcnrError(f"{name}={v!r}: must be a positive integer or null")
        positive = ("lora_alpha", "learning_rate", "epochs", "beta")
        for name in positive:
            if not 0.0 < getattr(self, name) < float("inf"):
                raise HcnrError(f"{name}={getattr(self, name)!r}: must be a finite number > 0")
        for name in ("weight_decay", "max_grad_norm", "orpo_lambda"):
            if not 0.0 <= getattr(self, name) < float("inf"):
                raise HcnrError(f"{name}={getattr(self, name)!r}: must be a finite number >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise HcnrError(f"warmup_ratio={self.warmup_ratio!r}: must be in [0, 1)")
        if self.checkpoint_every < 0:
            raise HcnrError(f"checkpoint_every={self.checkpoint_every!r}: must be >= 0")
        return self

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_rank


def load_train_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults <- YAML file ``path`` (a mapping of settings) <- non-None ``overrides``."""
    return TrainConfig.load(path, **overrides)
