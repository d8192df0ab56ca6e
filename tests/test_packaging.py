"""Every subpackage of the library is declared in pyproject.toml, so a built wheel is complete."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_all_subpackages_declared():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(tool["packages"])
    dirs = {v: k for k, v in tool["package-dir"].items()}
    found = set()
    for top in dirs:
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((dirs[top], *rel)))
    assert found == declared


def test_bundled_files_are_package_data():
    """Every shipped file (benchmark subsets, calibration data, labels, the default --demos) is
    matched by a package-data pattern, expanded as setuptools does (recursive glob)."""
    import glob

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    pkg = ROOT / tool["package-dir"]["hcnr_jax"]
    matched = {Path(f) for pattern in tool["package-data"]["hcnr_jax"]
               for f in glob.glob(pattern, root_dir=pkg, recursive=True)}
    shipped = {rel for rel in (p.relative_to(pkg) for p in (pkg / "bundled").rglob("*") if p.is_file())
               if not any(part.startswith(".") or part == "__pycache__" for part in rel.parts)}
    assert Path("bundled/demos.jsonl") in shipped
    assert shipped <= matched, sorted(map(str, shipped - matched))


# Distribution name -> the module it provides, where they differ.
MODULE_OF = {"pyyaml": "yaml", "scikit-learn": "sklearn", "orbax-checkpoint": "orbax"}
# Declared for a library we call through another: transformers' apply_chat_template needs jinja2.
INDIRECT = {"jinja2"}


def test_every_runtime_dependency_is_imported():
    """Declare exactly what is imported: each runtime dependency is imported by the package's code."""
    import re

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].strip().lower() for d in deps}
    code = "\n".join(p.read_text() for top in ("hcnr_jax", "kernels", "conversion") for p in (ROOT / top).rglob("*.py"))
    unused = sorted(n for n in names - INDIRECT
                    if not re.search(rf"^\s*(import|from)\s+{re.escape(MODULE_OF.get(n, n).replace('-', '_'))}\b",
                                     code, re.M))
    assert not unused, f"declared in pyproject.toml but never imported: {unused}"


def test_every_third_party_import_is_declared():
    """The converse: each module the package imports is the standard library, the package itself, a
    runtime dependency, or (imported only where that feature runs) one of an extra's."""
    import ast
    import re
    import sys

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [d for k, ds in project["optional-dependencies"].items() if k != "test" for d in ds]
    names = {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].strip().lower() for d in reqs}
    provided = {MODULE_OF.get(n, n).replace("-", "_") for n in names}
    imported = {}
    for top in ("hcnr_jax", "kernels", "conversion"):
        for p in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text())):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for mod in mods:
                    imported.setdefault(mod.split(".")[0], str(p.relative_to(ROOT)))
    undeclared = {m: f for m, f in imported.items()
                  if m not in sys.stdlib_module_names and m != "hcnr_jax" and m not in provided}
    assert not undeclared, f"imported but not declared in pyproject.toml (module: a file importing it): {undeclared}"


# The names transformers 5 imports from Hugging Face's `kernels` (integrations/hub_kernels.py,
# modeling_utils.py) when a `kernels` distribution 0.18.x is installed.
_FAKE_KERNELS = '''
class _Stub:
    def __init__(self, *args, **kwargs):
        pass
CUDAProperties = Device = KernelizeFallback = LayerRepository = LocalLayerRepository = ROCMProperties = Mode = _Stub
def _noop(*args, **kwargs):
    return lambda x: x
register_kernel_mapping = replace_kernel_forward_from_hub = use_kernel_mapping = get_kernel = kernelize = _noop
use_kernel_forward_from_hub = use_kernelized_func = _noop
'''


def _fake_distribution(site, name: str, init: str) -> None:
    """A package ``name`` with ``init`` as its __init__.py and dist-info metadata (version 0.18.2,
    what transformers 5.24 accepts), as pip would install it, under ``site``."""
    (site / name / "layer").mkdir(parents=True)
    (site / name / "__init__.py").write_text(f"ORIGIN = 'installed'\n{init}")
    (site / name / "layer" / "__init__.py").write_text("")
    (site / name / "layer" / "mode.py").write_text(f"from {name} import Mode\n")
    info = site / f"{name}-0.18.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.18.2\n")


def test_top_level_folders_never_shadow_installed_packages(tmp_path):
    """From the repository root (first on sys.path for `python -c`), `import kernels` and `import
    conversion` give the installed packages of those names, so transformers' model configs and
    modeling code import; without such packages our folders stay importable as before."""
    import os
    import subprocess
    import sys

    site = tmp_path / "site"
    _fake_distribution(site, "kernels", _FAKE_KERNELS)
    _fake_distribution(site, "conversion", "Mode = None\n")
    code = ("from transformers import LlamaConfig, Qwen2Config, Gemma3TextConfig\n"
            "import transformers.models.llama.modeling_llama\n"
            "import kernels, conversion, kernels.layer.mode\n"
            "import hcnr_jax.kernels.fisher_norms, hcnr_jax.conversion.hf\n"
            "print(kernels.ORIGIN, conversion.ORIGIN, kernels.CUDAProperties.__name__)\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["installed", "installed", "_Stub"]
    # Without the fake: the installed `kernels` if this environment has one (what Python finds outside the
    # repository), else the folder itself.
    env.pop("PYTHONPATH")
    where = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')"
    installed = subprocess.run([sys.executable, "-c", where], cwd=tmp_path, env=env, capture_output=True,
                               text=True).stdout.strip()
    run = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == (installed or str(ROOT / "kernels" / "__init__.py"))


def test_example_configs_are_shipped_and_addressable_by_name():
    """The example settings live in the package (installed with it) and `--config NAME` finds them;
    the checkout's configs/ links to the same files, so the two cannot drift."""
    from hcnr_jax.repair.config import RepairConfig, load_config
    from hcnr_jax.settings import CONFIGS_DIR, bundled_configs
    from hcnr_jax.train.config import load_train_config

    assert CONFIGS_DIR.is_relative_to(ROOT / "hcnr_jax" / "bundled")
    assert set(bundled_configs()) == {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    for p in (ROOT / "configs").glob("*.yaml"):
        assert p.resolve() == (CONFIGS_DIR / p.name).resolve()
    assert load_config("hcnr_default") == load_config("hcnr_default.yaml") == RepairConfig()
    assert load_config("hcnr_block_cg").layer_unit == "block"
    assert load_train_config("train_task").epochs == 1.0 and load_train_config("train_honest").epochs == 2.0
