#!/usr/bin/env bash
# The GPU check's software, rehearsed on this CPU: a virtual environment like the lent accelerator
# machine's image (Python 3.12, jax 0.11.2, transformers 5.17.0, numpy 2.5.2, no gguf or datasets;
# versions as that image was last seen), hcnr-jax installed into it the way experiments/gpu_check.sh
# installs it there (offline, no dependencies), then the tests that the device run depends on:
# kernels (and their lowering for CUDA), precision in the compiled HLO, statistics, model parity and
# gpu_check.sh --tiny. A device's minutes are few; this finds a version break before one is spent.
#
#     bash scripts/test_device_env.sh [--fresh] [pytest args]
#
# The environment is kept in build/device-env (--fresh rebuilds it). Without a Python 3.12 on this
# machine it says so and exits 0 without testing (the main suite, scripts/test.sh, still runs).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=build/device-env
if [ "${1:-}" = --fresh ]; then rm -rf "$venv"; shift; fi

py312=""
for c in python3.12 "$(command -v pyenv >/dev/null && pyenv root 2>/dev/null)/versions/3.12"*/bin/python3.12; do
  if [ -n "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then py312="$c"; break; fi
done
if [ -z "$py312" ]; then
  echo "test_device_env: no Python 3.12 here (jax 0.11 needs it); the device-image rehearsal did not run"
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  "$py312" -m venv "$venv.tmp"
  # The device image's versions where it pins what we use; the rest at our tested versions
  # (constraints.txt, less the lines the image overrides). torch is the CPU build standing in for the
  # image's CUDA one (the reference side of gpu_check's statistics rows).
  grep -v -i -E '^(jax|jaxlib|numpy|transformers|tokenizers|safetensors|huggingface-hub|torch)==' constraints.txt > "$venv.tmp/constraints.txt"
  "$venv.tmp/bin/python" -m pip install -q -c "$venv.tmp/constraints.txt" \
    jax==0.11.2 jaxlib==0.11.2 numpy==2.5.2 transformers==5.17.0 tokenizers==0.23.2 safetensors==0.8.0 \
    huggingface-hub==1.33.0 \
    torch==2.13.0 accelerate optax orbax-checkpoint chex ml_dtypes scikit-learn matplotlib pyyaml tqdm jinja2 \
    pytest setuptools
  mv "$venv.tmp" "$venv"
fi
# As on the device (experiments/gpu_check.sh): offline, without dependencies, over what is there.
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
  || "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation --no-index -e .
for absent in gguf datasets; do
  if "$venv/bin/python" -c "import $absent" 2>/dev/null; then echo "test_device_env: $absent is installed, unlike on the device" >&2; exit 1; fi
done
"$venv/bin/python" -c 'import jax, transformers; print(f"test_device_env: jax {jax.__version__}, transformers {transformers.__version__}")'
PATH="$PWD/$venv/bin:$PATH" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_kernels.py tests/test_precision.py tests/test_stats.py tests/test_model.py tests/test_gpu_check.py "$@"
