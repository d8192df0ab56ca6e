"""Choosing a training setting (DPO's ``beta``, a learning rate, ...) on development data, by the same
rule that chooses HCNR's ``r_cw`` and the merge's ``alpha`` (`hcnr_jax.repair.choose`; docs/method.md,
"Choosing a setting"): train once per candidate value, score each trained model with forward passes on
the development split, keep the candidates that hold half of the task gain, take the best honesty.

The rule's two references are the model before the task fine-tune (``base``: the honest one) and the
model training starts from (the fine-tuned one), exactly as for a repair of that pair."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from hcnr_jax.errors import HcnrError
from hcnr_jax.repair.choose import DevData, DevScore, choose, dev_score
from hcnr_jax.train.config import TrainConfig
from hcnr_jax.train.loop import TrainResult, train

# TrainConfig fields a rule may choose: the numeric ones a user tunes per run.
CHOOSABLE = ("beta", "learning_rate", "orpo_lambda", "epochs", "weight_decay", "lora_rank", "lora_alpha")


def candidate_configs(tc: TrainConfig, name: str, values: Sequence[float]) -> dict[float, TrainConfig]:
    """``{value: tc with name = value}``, each validated (`HcnrError` naming the setting)."""
    if name not in CHOOSABLE:
        raise ValueError(f"cannot choose {name!r}; one of {CHOOSABLE}")
    cast = int if isinstance(getattr(tc, name), int) else float
    out = {}
    for v in values:
        if cast is int and v != int(v):
            raise HcnrError(f"--choose {name}={v:g}: {name} is a whole number")
        out[v] = tc.override(**{name: cast(v)})
    return out


def train_and_choose(model: Any, data: Any, tc: TrainConfig, name: str, values: Sequence[float], dev: DevData,
                     base: DevScore, *, checkpoint_dir: str | Path | None = None, mesh: Any = None,
                     log: Callable[[str], None] = print) -> TrainResult:
    """Train ``model`` on ``data`` with ``tc`` at each value of setting ``name``, score each result on
    ``dev`` and return the chosen one, its report holding the choice. ``base``: the development score
    of the model before the task fine-tune. Checkpoints of each candidate go to
    ``checkpoint_dir/NAME_VALUE`` (a rerun resumes every candidate). One candidate's parameters are kept
    in memory at a time: the rule's floor depends on the references only, so the best so far is final
    among the values seen."""
    configs = candidate_configs(tc, name, values)
    start = dev_score(model.params, model, dev)
    best: tuple[float, TrainResult] | None = None
    scores: dict[float, DevScore] = {}
    for v, cfg in configs.items():
        log(f"--choose: training at {name} = {v:g}")
        ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / f"{name}_{v:g}"
        result = train(model, data, cfg, checkpoint_dir=ckpt, mesh=mesh)
        scores[v] = dev_score(result.params, model, dev)
        if best is None or choose(scores, base, start)["chosen"] == v:
            # LoRA runs are written from the adapter alone: the kept run drops its merged parameters.
            best = (v, replace(result, params=None) if cfg.method == "lora" else result)
    choice = choose(scores, base, start)
    choice.update(setting=name)
    assert best is not None and best[0] == choice["chosen"]
    chosen = best[1]
    return replace(chosen, report={**chosen.report, "choice": choice})
