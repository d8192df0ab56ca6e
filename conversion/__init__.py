"""Checkpoint formats: Hugging Face safetensors directories, GGUF, PEFT LoRA adapters (installed as
``hcnr_jax.conversion``).

This folder is part of the repository's layout, not a top-level package: PyPI has a ``conversion``
package, and Python run from the repository root would find this folder first. When imported under
that top-level name, this file hands the name over to the installed package of that name, if there
is one (`_yield_name`, the same as ``kernels/__init__.py``'s).
"""


if __name__ == "conversion":
    # kernels/__init__.py holds the one `_yield_name`; loaded from its file under a private name (importing
    # "kernels" here could itself resolve to another package).
    import importlib.util as _util
    import os as _os

    _spec = _util.spec_from_file_location(
        "_hcnr_yield_name", _os.path.join(_os.path.dirname(__path__[0]), "kernels", "__init__.py"))
    _mod = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
    _mod._yield_name(__name__, __path__[0])
