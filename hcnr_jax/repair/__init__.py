"""HCNR repair (docs/method.md): selection, restoration + compensation solvers, the pipeline, reports.

``repair(base, finetuned, honesty_data, task_data, config)`` returns the repaired model and its
report; ``write_repair(result, out_dir)`` writes both. Solvers are registered by name in
``SOLVERS`` (see `hcnr_jax.repair.solvers` for the interface).
"""

import sys
import types

from hcnr_jax.repair.config import RepairConfig, load_config
from hcnr_jax.repair.pipeline import RepairResult, check_compatible, plan, repair, write_repair
from hcnr_jax.repair.solvers import SOLVERS, SolverResult, make_result, register_solver, solve

__all__ = ["SOLVERS", "RepairConfig", "RepairResult", "SolverResult", "check_compatible", "load_config",
           "make_result", "plan", "register_solver", "repair", "solve", "write_repair"]


class _CallablePackage(types.ModuleType):
    """Lets ``hcnr_jax.repair(...)`` call `repair` while ``hcnr_jax.repair.solvers`` etc. stay
    importable (binding the function over the package name would shadow the submodules)."""

    def __call__(self, *args, **kwargs):
        return repair(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
