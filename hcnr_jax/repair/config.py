"""`RepairConfig`: every setting of an HCNR repair, with the defaults of docs/method.md.

Settings marked [paper] follow the paper as printed; [ours] are choices the sources leave open.
A config is built from defaults, then a YAML file, then explicit overrides (CLI flags), and is
validated once; the resolved config is saved in the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hcnr_jax.errors import HcnrError
from hcnr_jax.settings import Settings

PRIORITIES = ("kl", "diff", "hon_only", "random")
LAYER_UNITS = ("module", "block")
NEURON_AXES = ("input", "output")
MODELS = ("orig", "sft")
CALIB_DATA = ("hon", "task", "both")
LAYER_BUDGETS = ("count", "params")

# The options each built-in solver of hcnr_jax/repair/solvers.py accepts (its keyword-only
# arguments; tests/test_repair.py checks this table against the signatures), with a check of the
# value and what it must be. A solver from a module (``module:name``) or registered by a user is
# not checked here.
def _positive_int(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() and v >= 1


def _positive_float(v: Any) -> bool:
    """YAML reads ``1e-5`` (no dot) as a string: a number written as text is accepted."""
    try:
        return not isinstance(v, bool) and 0.0 < float(v) < math.inf
    except (TypeError, ValueError):
        return False


_POSITIVE_INT = (_positive_int, "a positive integer")
_POSITIVE_FLOAT = (_positive_float, "a finite number > 0")
SOLVER_OPTIONS: dict[str, dict[str, tuple[Any, str]]] = {
    "none": {},
    "exact": {},
    "paper": {},
    "cg": {"iters": _POSITIVE_INT, "tol": _POSITIVE_FLOAT},
}


@dataclass(frozen=True)
class RepairConfig(Settings):
    """Settings of one repair (docs/method.md).

    - ``r_iw``: fraction of neurons per layer that are candidates [paper 0.5].
    - ``r_cw``: fraction of layers kept [paper 0.4].
    - ``priority``: ``kl`` (s_hon log(s_hon/s_task)) [paper], ``diff``, ``hon_only``, ``random``.
    - ``layer_unit``: ``module`` (one linear weight) [ours] or ``block`` (a transformer block's 7).
    - ``layer_budget``: R_CW counts layers (``count``, as printed) or parameters (``params``:
      the prefix of layers by d_j whose parameter count is closest to r_cw of the total) [ours].
    - ``neuron_axis``: ``input`` (columns W[:, k]) [ours] or ``output`` (rows). With rows the
      layer objective separates by row, so restore-only is already its optimum (see solvers).
    - ``fisher_hon_model`` / ``fisher_task_model``: model each Fisher is taken on [ours: orig / sft].
    - ``calib_data`` / ``calib_model``: data (hon/task/both) and model (orig/sft) whose layer
      inputs make H = X^T X [ours: hon / sft].
    - ``solver``: name in the solver registry [ours: ``exact``; the paper names no default. The
      paper's printed update is ``paper``; ``exact`` is the joint optimum of the same objective,
      so it never does worse on it, and equals ``paper`` when one neuron is pinned].
    - ``solver_options``: extra keyword arguments for the solver (``iters``, ``tol`` for ``cg``;
      the other built-in solvers take none). Unknown keys are an error (`SOLVER_OPTIONS`).
    - ``damping``: lambda of ``H + lambda * mean(diag H) * I`` [ours 0.01].
    - ``eps``: added to the normalised Fisher scores before the log [ours 1e-8].
    - ``seed``: seeds ``priority=random`` (nothing else is random).
    - ``max_length``, ``batch_size``, ``limit``: tokenisation length, statistics batch size, and
      how many samples of each file to use (None: all).
    - ``hessian_passes``: passes over the calibration data for the Hessians, each accumulating a
      share of the kept layers (about 1/N of the accumulators' device memory, N forward passes;
      same result) [1]. ``hcnr plan`` shows what a value saves.
    """

    r_iw: float = 0.5
    r_cw: float = 0.4
    priority: str = "kl"
    layer_unit: str = "module"
    layer_budget: str = "count"
    neuron_axis: str = "input"
    fisher_hon_model: str = "orig"
    fisher_task_model: str = "sft"
    calib_data: str = "hon"
    calib_model: str = "sft"
    solver: str = "exact"
    solver_options: Mapping[str, Any] = field(default_factory=dict)
    damping: float = 0.01
    eps: float = 1e-8
    seed: int = 0
    max_length: int = 512
    batch_size: int = 8
    limit: int | None = None
    hessian_passes: int = 1

    def validate(self) -> RepairConfig:
        """Raise `HcnrError` naming the field for any setting out of range; return self."""
        from hcnr_jax.repair.solvers import get_solver

        for name in ("r_iw", "r_cw"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 < float(v) <= 1.0:
                raise HcnrError(f"{name}={v!r}: must be a number in (0, 1]")
        choices = {"priority": PRIORITIES, "layer_unit": LAYER_UNITS, "layer_budget": LAYER_BUDGETS,
                   "neuron_axis": NEURON_AXES, "fisher_hon_model": MODELS, "fisher_task_model": MODELS,
                   "calib_data": CALIB_DATA, "calib_model": MODELS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise HcnrError(f"{name}={getattr(self, name)!r}: choose one of {list(allowed)}")
        get_solver(self.solver)
        if not isinstance(self.solver_options, Mapping):
            raise HcnrError(f"solver_options={self.solver_options!r}: must be a mapping")
        accepted = SOLVER_OPTIONS.get(self.solver)
        if accepted is not None:
            for key, value in self.solver_options.items():
                if key not in accepted:
                    raise HcnrError(
                        f"solver_options: unknown option {key!r} for solver {self.solver!r}; it accepts "
                        + (", ".join(accepted) if accepted else "no options"))
                check, what = accepted[key]
                if not check(value):
                    raise HcnrError(f"solver_options: {key}={value!r} for solver {self.solver!r} must be {what}")
        if not 0.0 <= self.damping < float("inf"):
            raise HcnrError(f"damping={self.damping!r}: must be a finite number >= 0")
        if not 0.0 < self.eps < float("inf"):
            raise HcnrError(f"eps={self.eps!r}: must be a finite number > 0")
        for name in ("max_length", "batch_size", "hessian_passes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise HcnrError(f"{name}={getattr(self, name)!r}: must be a positive integer")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise HcnrError(f"limit={self.limit!r}: must be a positive integer or null")
        if not isinstance(self.seed, int):
            raise HcnrError(f"seed={self.seed!r}: must be an integer")
        return self


def load_config(path: str | Path | None = None, **overrides: Any) -> RepairConfig:
    """Defaults <- YAML file ``path`` (a mapping of settings) <- non-None ``overrides``."""
    return RepairConfig.load(path, **overrides)
