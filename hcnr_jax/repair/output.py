"""What a repair (or merge) writes, in words: the dtype of the written weights and the closing
lines a user can act on.

The dtype rule (``--dtype``, docs/method.md "Output dtype"): the statistics and the solve are
float32 whatever the inputs; only the written weights are cast. By default they take the
fine-tuned input's stored float type (a Hugging Face folder's dtype; an F32/F16/BF16 GGUF's). A
quantised GGUF (Q4_1, Q8_0, Q4_K, ...) has no float type: its weights are written as bfloat16,
which keeps float32's range at half its size (a 98 MB Q4_1 SmolLM2 becomes 273 MB, not 538 MB),
while bfloat16's rounding (about 3 significant digits) is far finer than the 4-bit grid the
weights came from. The repaired weights themselves are not quantised back: write GGUF files
with llama.cpp's tools if you need one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from hcnr_jax.conversion.hf import DTYPES
from hcnr_jax.pretrained import Pretrained
from hcnr_jax.source import ModelSource

# GGUF tensor types that are plain floats (anything else is a quantisation scheme).
_GGUF_FLOATS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
QUANTISED_DEFAULT = "bfloat16"


def stored_dtype(src: Any, loaded: Pretrained | None = None) -> tuple[str | None, str]:
    """(the float dtype ``src``'s weights are stored in, or None for a quantised GGUF; a few words
    on where that comes from). ``loaded``: the model already loaded from ``src`` (HF folders)."""
    source = ModelSource.parse(src)
    if source.is_gguf and not source.hub:
        from hcnr_jax.conversion.gguf_reader import GGUFFile

        kinds = {t.tensor_type.name for t in GGUFFile(Path(source.base)).tensors if len(t.shape) >= 2}
        if kinds <= set(_GGUF_FLOATS) and len(kinds) == 1:
            return _GGUF_FLOATS[kinds.pop()], "the fine-tuned input's GGUF float type"
        return None, f"the fine-tuned input reads a quantised GGUF: {', '.join(sorted(kinds))}"
    if loaded is None:
        return None, "unknown"
    return str(loaded.dtype), "the fine-tuned input's dtype"


def output_dtype(requested: str | None, finetuned: Any, loaded: Pretrained | None = None) -> tuple[str, str]:
    """(dtype name to write, why): ``requested`` when given, else the rule of the module doc."""
    if requested is not None:
        return requested, "--dtype"
    stored, why = stored_dtype(finetuned, loaded)
    if stored is None:
        return QUANTISED_DEFAULT, f"{why}, no float type; --dtype to choose"
    return stored, why


def cast(model: Pretrained, dtype: str) -> Pretrained:
    """``model`` with every parameter cast to ``dtype`` (a no-op where it already is)."""
    target = jnp.dtype(DTYPES[dtype])
    if all(leaf.dtype == target for leaf in jax.tree.leaves(model.params)):
        return model
    return model.replace(params=jax.tree.map(lambda x: jnp.asarray(x).astype(target), model.params))


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def closing_lines(report: dict[str, Any], out: Path, dtype: str, why: str, finetuned: str) -> list[str]:
    """What the repair did and where it went, in words, and the command that checks it."""
    from hcnr_jax.user_cache import human

    s = report["summary"]
    neurons = sum(r["restored_neurons"] for r in report["layers"])
    kept, layers = s["layers_kept"], s["layers"]
    comp = s["compensation"]
    how = ("the rest of those layers was left as fine-tuned (no compensation)" if comp in ("none",) or
           comp.startswith("restore-only") else f"the rest of those layers was adjusted to compensate (solver {comp})")
    seconds = sum(report.get("timing_s", {}).values())
    return [
        f"Restored {neurons:,} neurons ({s['restored_params']:,} parameters, "
        f"{100 * s['restored_fraction_of_linear']:.1f}% of the block linear weights) to their values before "
        f"fine-tuning, in {kept} of {layers} layers; {how}; the other {layers - kept} layers are unchanged.",
        f"Wrote the repaired model to {out}: {dtype}, {human(folder_bytes(out))} ({why}), in {seconds:.0f} s; "
        f"layer by layer in {out / 'hcnr_report.md'}.",
        "Check it against the fine-tuned model on the same questions (honesty benchmarks; add --task-data with "
        "held-out examples of your task, {\"prompt\", \"response\"} JSONL):",
        f"  hcnr compare --model {finetuned} --model {out} --out {out}_compare",
    ]
