"""HCNR repair (docs/method.md): selection, restoration + compensation solvers, the pipeline, reports.

``repair(base, finetuned, honesty_data, task_data, config)`` returns the repaired model and its
report (its stages: `hcnr_jax.repair.pipeline`); ``write_repair(result, out_dir)`` writes both.
Solvers are registered by name in ``SOLVERS`` (see `hcnr_jax.repair.solvers` for the interface).
"""

from hcnr_jax.repair.config import RepairConfig, load_config
from hcnr_jax.repair.pipeline import RepairResult, check_compatible, repair, write_repair
from hcnr_jax.repair.solvers import SOLVERS, SolverResult, make_result, register_solver, solve

__all__ = ["SOLVERS", "RepairConfig", "RepairResult", "SolverResult", "check_compatible", "load_config",
           "make_result", "register_solver", "repair", "solve", "write_repair"]

