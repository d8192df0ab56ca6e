"""Pallas kernels, each beside its plain jax.numpy reference (installed as ``hcnr_jax.kernels``).

This folder is part of the repository's layout, not a top-level package: Python run from the
repository root puts the root first on ``sys.path``, so ``import kernels`` would find this folder
before Hugging Face's ``kernels`` package (which transformers 5 imports) and break transformers.
When imported under that top-level name, this file hands the name over to the installed package
of that name, if there is one (`_yield_name`).
"""


def _yield_name(name: str, folder: str) -> None:
    """Replace ``sys.modules[name]`` (this folder, imported by mistake as a top-level package) by
    the package of that name found on ``sys.path`` outside the folder's parent, when there is one;
    the import statement then returns that package. Without one, nothing changes."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    root = os.path.realpath(os.path.dirname(folder))
    path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None or not spec.has_location:
        return  # no other package of that name (or only a namespace folder): stay
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


if __name__ == "kernels":
    _yield_name(__name__, __path__[0])
