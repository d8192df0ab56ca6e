#!/usr/bin/env bash
# The prepared GPU check of hcnr-jax, as one command for a lent accelerator machine.
#
# On the device machine (the workplace's `device` tool: run with timeout_s=600, nothing to carry):
#     bash experiments/gpu_check.sh
# It installs hcnr-jax alone, offline, over the machine's own jax/torch/transformers, checks that jax
# sees the GPU (else it stops at once: the 8B rows would spend the call on a CPU), then runs
# experiments/gpu_check.py with a deadline that fits one 600 s call. Rows are written as they finish,
# so a run cut at the limit still returns what it measured. Results land in $OUT (device machine)
# or out/gpu_check/ (elsewhere): gpu_check.json, gpu_check.log, preflight.txt, install.log.
# Commit them as experiments/results/gpu_check_<device>_<date>.{json,log}; where the run prints a
# "VERIFIED may now list" line, add that platform to VERIFIED in kernels/backend.py.
#
# On a CPU (a test of this script; tests/test_gpu_check.py runs it):
#     HCNR_GPU_CHECK_INSTALL=0 bash experiments/gpu_check.sh --tiny
# Settings: HCNR_GPU_CHECK_DEADLINE (seconds after which sections not yet started are skipped, 330),
# HCNR_GPU_CHECK_TIMEOUT (hard stop, 560), HCNR_GPU_CHECK_INSTALL (0: use the installed package).
# Arguments are passed on to gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/out/gpu_check}"
mkdir -p "$out"

if [ "${HCNR_GPU_CHECK_INSTALL:-1}" = 1 ]; then
  # The device image cannot fetch packages; it holds every runtime dependency gpu_check.py imports
  # (it needs neither gguf nor datasets), so the package goes in without its dependencies.
  if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1; then
    tail -20 "$out/install.log"
    echo "gpu_check.sh: installing hcnr-jax failed (log: $out/install.log)" >&2
    exit 3
  fi
fi

tiny=0
for a in "$@"; do [ "$a" = --tiny ] && tiny=1; done
# Versions and devices first: a jax that does not see the GPU ends the run here, in seconds.
if ! TINY=$tiny python3 - >"$out/preflight.txt" 2>&1 <<'EOF'
import importlib.metadata as md
import os
import sys

import jax

for name in ("jax", "jaxlib", "torch", "transformers", "safetensors", "numpy", "hcnr-jax"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} (not installed)")
print(f"python {sys.version.split()[0]}; backend {jax.default_backend()}; devices {jax.devices()}")
if jax.default_backend() != "gpu" and os.environ["TINY"] != "1":
    sys.exit("no GPU visible to jax: stopping before the 8B rows (pass --tiny to run on this CPU)")
EOF
then
  cat "$out/preflight.txt"
  echo "gpu_check.sh: preflight failed (above)" >&2
  exit 4
fi
cat "$out/preflight.txt"

PYTHONUNBUFFERED=1 timeout "${HCNR_GPU_CHECK_TIMEOUT:-560}" python3 experiments/gpu_check.py \
  --deadline "${HCNR_GPU_CHECK_DEADLINE:-330}" --out "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "gpu_check.sh: stopped at ${HCNR_GPU_CHECK_TIMEOUT:-560} s; the rows finished are in $out/gpu_check.json" >&2
exit "$rc"
