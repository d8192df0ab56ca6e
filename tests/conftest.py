import os
import sys
from pathlib import Path

import pytest

# tests/ is a folder of scripts, not a package: make its helpers (tiny.py) importable.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tiny


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
