import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# tests/ is a folder of scripts, not a package: make its helpers (tiny.py) importable.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tiny

# The tests never read or write the user's real cache (~/.cache/hcnr): one temporary user cache for
# the session, set before anything runs so that the commands' subprocesses inherit it too; removed
# at exit. Tests about the cache itself point $HCNR_CACHE at their own folders.
_USER_CACHE = tempfile.mkdtemp(prefix="hcnr_test_cache_")
os.environ["HCNR_CACHE"] = _USER_CACHE
for _var in ("HCNR_CACHE_DIR", "HCNR_CACHE_MAX_SIZE"):
    os.environ.pop(_var, None)
atexit.register(shutil.rmtree, _USER_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> (torch model, saved HF directory), float32, built once per session."""
    out = {}
    for family in tiny.FAMILIES:
        model = tiny.hf_model(family)
        out[family] = (model, tiny.save_hf(model, tmp_path_factory.mktemp(f"tiny_{family}")))
    return out


@pytest.fixture(scope="session")
def llama2_dir(tmp_path_factory):
    """A two-layer tiny Llama saved as an HF directory, built once per session."""
    return tiny.save_hf(tiny.hf_model("llama", num_hidden_layers=2), tmp_path_factory.mktemp("llama2"))
