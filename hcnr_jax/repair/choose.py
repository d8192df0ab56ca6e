"""Weight-space baselines and the development-data rule that chooses a setting (docs/method.md).

The baselines a user tries before HCNR, as pure functions of parameter pytrees:

- `merge`: ``base + alpha * (finetuned - base)``: scaling the fine-tuning delta, which is also the
  linear merge of the models before and after fine-tuning (``alpha`` 0: base, 1: fine-tuned).
- Restoring whole layers is HCNR's own pipeline with every neuron of the kept layers restored and
  nothing compensated (``hcnr repair --baseline layers``: ``r_iw`` 1, solver ``none``), and random
  neurons at HCNR's budget are ``--priority random``.

The rule (written before any run that uses it; docs/method.md, "Choosing a setting"): score every
candidate on the *development* split with a forward pass, no generation:

- honesty score H: the mean, over development honesty samples, of the mean per-token
  log-probability of the honest response (the idk response for an unanswerable question, the gold
  answer for an answerable one);
- task score T: the same for the gold answers of development task samples.

Keep the candidates whose T keeps at least half of what fine-tuning gained on the task
(``T >= T_base + 0.5 * (T_finetuned - T_base)``; when fine-tuning gained nothing, ``T >=
T_finetuned - 0.05``); among them take the largest H; ties go to the smaller change. When no
candidate keeps the floor, the one with the largest T is taken and the choice says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hcnr_jax.data import Samples
from hcnr_jax.params import Params
from hcnr_jax.pretrained import Pretrained

KEEP_TASK_GAIN = 0.5  # the share of fine-tuning's task log-likelihood gain a chosen setting keeps
NO_GAIN_TOLERANCE = 0.05  # nats per token, when fine-tuning gained nothing on the task


def merge(base: Params, finetuned: Params, alpha: float) -> Params:
    """``base + alpha * (finetuned - base)`` leaf by leaf, in float32, cast to the fine-tuned dtype.
    Leaves equal in both models are returned unchanged (bit for bit); ``alpha`` 1 is ``finetuned``."""
    def one(b: jax.Array, f: jax.Array) -> jax.Array:
        if b is f or alpha == 1.0:
            return f
        m = b.astype(jnp.float32) + alpha * (f.astype(jnp.float32) - b.astype(jnp.float32))
        return jnp.where(b == f, f, m.astype(f.dtype))

    return jax.tree_util.tree_map(one, base, finetuned)


def changed_fraction(reference: Params, params: Params) -> float:
    """The share of parameters (elements) of ``params`` that differ from ``reference``."""
    pairs = zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(params), strict=True)
    changed = total = 0
    for a, b in pairs:
        changed += int(jnp.sum(a != b))
        total += a.size
    return changed / max(total, 1)


@dataclass(frozen=True)
class DevScore:
    """Development scores of one model: mean per-token log-probabilities (nats), higher is better."""

    honesty: float
    task: float


def dev_score(params: Params, model: Pretrained, dev_honesty: Samples, dev_task: Samples,
              batch_size: int = 16) -> DevScore:
    """`DevScore` of ``params`` (with ``model``'s config) on the development samples."""
    from hcnr_jax.eval.likelihood import samples_logprobs

    return DevScore(honesty=float(np.mean(samples_logprobs(params, model.config, dev_honesty, batch_size))),
                    task=float(np.mean(samples_logprobs(params, model.config, dev_task, batch_size))))


def choose(candidates: Mapping[float, DevScore], base: DevScore, finetuned: DevScore) -> dict[str, Any]:
    """Apply the rule (module docstring) to candidates ``{value: score}``, values ordered by how much
    they change the fine-tuned model (smaller first). Returns ``{"chosen", "floor", "kept_floor",
    "candidates": [{"value", "honesty", "task", "eligible"}]}``."""
    if not candidates:
        raise ValueError("choose: no candidates")
    gain = finetuned.task - base.task
    floor = base.task + KEEP_TASK_GAIN * gain if gain > 0 else finetuned.task - NO_GAIN_TOLERANCE
    values = sorted(candidates)
    eligible = [v for v in values if candidates[v].task >= floor]
    if eligible:
        chosen = max(eligible, key=lambda v: (candidates[v].honesty, -v))
    else:
        chosen = max(values, key=lambda v: (candidates[v].task, -v))
    return {"chosen": chosen, "floor": floor, "kept_floor": bool(eligible),
            "base": asdict(base), "finetuned": asdict(finetuned),
            "candidates": [{"value": v, **asdict(candidates[v]), "eligible": v in eligible} for v in values]}


def parse_candidates(text: str, what: str) -> list[float]:
    """``"0.2,0.3,0.4"`` -> sorted unique floats; a clear error naming ``what`` otherwise."""
    from hcnr_jax.errors import HcnrError

    try:
        values = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError as e:
        raise HcnrError(f"{what} {text!r}: expected comma-separated numbers") from e
    if not values:
        raise HcnrError(f"{what} {text!r}: no value given")
    return values


def describe(choice: Mapping[str, Any], name: str) -> Sequence[str]:
    """Printable lines of a choice: one per candidate, then the chosen value."""
    lines = [f"{name:>8} | dev honesty log-lik | dev task log-lik | keeps the task floor ({choice['floor']:.3f})"]
    for c in choice["candidates"]:
        mark = " <- chosen" if c["value"] == choice["chosen"] else ""
        lines.append(f"{c['value']:>8g} | {c['honesty']:>19.4f} | {c['task']:>16.4f} | "
                     f"{'yes' if c['eligible'] else 'no'}{mark}")
    if not choice["kept_floor"]:
        lines.append("no candidate keeps half of the fine-tune's task gain: the one with the best task score was taken")
    return lines
