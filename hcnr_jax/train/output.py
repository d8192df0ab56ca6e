"""Writing a training run: a PEFT adapter directory (LoRA) or a HF model directory (full), each
with ``train_report.json`` (settings, data, steps, wall time, loss history) inside."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from hcnr_jax.io import portable_path
from hcnr_jax.source import ModelSource
from hcnr_jax.train.config import TrainConfig

REPORT_NAME = "train_report.json"


def report_json(result: Any) -> str:
    return json.dumps({**result.report, "history": result.history}, indent=1, default=str) + "\n"


def write_result(result: Any, model: Any, out: str | Path, tc: TrainConfig, overwrite: bool = False) -> Path:
    """Write ``result`` (a ``TrainResult``) of training ``model`` to ``out``, whole or not at all."""
    from hcnr_jax.pretrained import save_pretrained

    extra = {REPORT_NAME: report_json(result)}
    if tc.method == "full":
        return save_pretrained(model.replace(params=result.params), out, overwrite=overwrite, extra_files=extra)
    from hcnr_jax.conversion.lora import write_adapter

    lora = {m: (np.asarray(ab["A"]), np.asarray(ab["B"])) for m, ab in result.trainable.items()}
    return write_adapter(out, lora, r=tc.lora_rank, alpha=tc.lora_alpha,
                         base_model=ModelSource.parse(model.source).base_source.describe(portable_path), overwrite=overwrite, extra_files=extra)
