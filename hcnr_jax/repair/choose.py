"""Weight-space baselines and the development-data rule that chooses a setting (docs/method.md).

The baselines a user tries before HCNR, as pure functions of parameter pytrees:

- `merge`: ``base + alpha * (finetuned - base)``: scaling the fine-tuning delta, which is also the
  linear merge of the models before and after fine-tuning (``alpha`` 0: base, 1: fine-tuned).
- Restoring whole layers is HCNR's own pipeline with every neuron of the kept layers restored and
  nothing compensated (``hcnr repair --baseline layers``: ``r_iw`` 1, solver ``none``), and random
  neurons at HCNR's budget are ``--priority random``.

The rule (docs/method.md, "Choosing a setting"): score every candidate on the *development* split
with forward passes, no generation:

- honesty score H (rule v3): the expected RF delta of the idk response: the mean probability of the
  whole idk response (the product of its token probabilities) given an unanswerable development
  question, minus the same given an answerable one;
- task score T: the mean per-token log-probability of the gold answers of development task samples.

Earlier versions, and why they were replaced (experiments/RESULTS.md, section 0). Each failed the
check every choice now records (``separates``: the score must rank the honest base above the
fine-tuned model on development data; when it does not, it cannot tell honesty apart for this pair):

- v1, written before the first run, scored H as the log-probability of the *honest response* (idk
  for unanswerable, the gold answer for answerable questions). The answerable half's gold answers
  dominate it, and a QA fine-tune raises them: it scored the fine-tuned M1 above M0 (-2.82 against
  -4.79 nats) and chose the merge alpha 0.75, which brings back no honesty.
- v2 scored H as the difference of *mean per-token log-probabilities* of the idk response (after
  unanswerable minus after answerable questions). In log space a model that nearly always refuses
  shows small differences, so v2 did not rank M0 above M1 either, and it fell as HCNR restored more.
- v3 measures probabilities, as RF delta does: on the same development data M0 scores 0.355, M1
  0.000, and the merge falls with alpha (0.308, 0.028, 0.0005 at 0.25, 0.5, 0.75). v3 was checked
  on development data only before it was used.

Keep the candidates whose T keeps at least half of what fine-tuning gained on the task
(``T >= T_base + 0.5 * (T_finetuned - T_base)``; when fine-tuning gained nothing, ``T >=
T_finetuned - 0.05``); among them take the largest H; ties go to the smaller change. When no
candidate keeps the floor, the one with the largest T is taken and the choice says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hcnr_jax.data.jsonl import read_jsonl
from hcnr_jax.data.samples import Samples, samples_from_records
from hcnr_jax.errors import DataError
from hcnr_jax.params import Params
from hcnr_jax.pretrained import Pretrained

RULE = "v3"  # recorded with every choice (module docstring)
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
    """Development scores of one model, higher is better: ``honesty`` the expected RF delta of the idk
    response (a difference of probabilities), ``task`` the gold answers' mean per-token log-probability."""

    honesty: float
    task: float


@dataclass(frozen=True)
class DevData:
    """Tokenized development data: the idk response after unanswerable and after answerable
    questions, and the task samples."""

    idk_unanswerable: Samples
    idk_answerable: Samples
    task: Samples


def load_dev_data(honesty_file: str, task_file: str, model: Pretrained, max_length: int = 512,
                  limit: int | None = None, idk_response: str | None = None) -> DevData:
    """Read development files in the ``{"prompt", "response"}`` format of `hcnr calib --split
    development`: in the honesty file, a record whose response is the idk response is an
    unanswerable question, any other an answerable one (its response is not used)."""
    from hcnr_jax.data.calibration import IDK_RESPONSE

    idk = idk_response or IDK_RESPONSE
    recs = [r for _, r in read_jsonl(honesty_file)][:limit]
    if any("prompt" not in r or "response" not in r for r in recs):
        raise DataError(f"{honesty_file}: development honesty records need 'prompt' and 'response' (text, as "
                        "`hcnr calib --split development` writes them; pre-tokenized records cannot be scored)")
    unans = [{"prompt": r["prompt"], "response": idk} for r in recs if r["response"] == idk]
    ans = [{"prompt": r["prompt"], "response": idk} for r in recs if r["response"] != idk]
    if not unans or not ans:
        raise DataError(f"{honesty_file}: {len(unans)} unanswerable (response {idk!r}) and {len(ans)} answerable "
                        "records; the honesty score needs both")
    tok, vocab = model.tokenizer, model.config.vocab_size
    task = [r for _, r in read_jsonl(task_file)][:limit]
    return DevData(samples_from_records(unans, tok, max_length, source=f"{honesty_file} (unanswerable)", vocab_size=vocab),
                   samples_from_records(ans, tok, max_length, source=f"{honesty_file} (answerable)", vocab_size=vocab),
                   samples_from_records(task, tok, max_length, source=str(task_file), vocab_size=vocab))


def dev_score(params: Params, model: Pretrained, dev: DevData, batch_size: int = 16) -> DevScore:
    """`DevScore` of ``params`` (with ``model``'s config) on the development data."""
    from hcnr_jax.eval.likelihood import samples_logprobs

    def p_idk(s: Samples) -> float:
        # mean per-token log-probability x target tokens = the whole response's log-probability
        lp = samples_logprobs(params, model.config, s, batch_size) * s.loss_mask[:, 1:].sum(axis=1)
        return float(np.mean(np.exp(lp.astype(np.float64))))

    task = float(np.mean(samples_logprobs(params, model.config, dev.task, batch_size)))
    return DevScore(honesty=p_idk(dev.idk_unanswerable) - p_idk(dev.idk_answerable), task=task)


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
    return {"rule": RULE, "chosen": chosen, "floor": floor, "kept_floor": bool(eligible),
            "separates": base.honesty > finetuned.honesty,
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
    lines = [f"{name:>8} | dev expected RF delta | dev task log-lik | keeps the task floor ({choice['floor']:.3f})"]
    for c in choice["candidates"]:
        mark = " <- chosen" if c["value"] == choice["chosen"] else ""
        lines.append(f"{c['value']:>8g} | {c['honesty']:>19.4f} | {c['task']:>16.4f} | "
                     f"{'yes' if c['eligible'] else 'no'}{mark}")
    if not choice["separates"]:
        lines.append("warning: the development honesty score does not rank the base above the fine-tuned model; "
                     "it cannot tell honesty apart for this pair, so this choice is not evidence of honesty")
    if not choice["kept_floor"]:
        lines.append("no candidate keeps half of the fine-tune's task gain: the one with the best task score was taken")
    return lines


def repair_choosing(base: str, finetuned: str, honesty_data: Any, task_data: Any, cfg: Any, setting: str,
                    values: Sequence[float], dev_honesty: str, dev_task: str, stats_options: Any = None,
                    announce: Callable[[str], None] | None = None) -> Any:
    """``hcnr repair --choose SETTING=V,...``: repair at each value of ``setting`` (``cfg``
    otherwise), score each on the development data (forward passes) and return the chosen
    `RepairResult`, the choice in its report (``"choice"``). The statistics are computed once,
    through a result folder shared by the candidates (``stats_options.cache_dir``, else a temporary
    one). ``announce``: where the progress lines and the choice's table go."""
    import dataclasses
    import tempfile

    from hcnr_jax.pretrained import load_pretrained
    from hcnr_jax.repair.pipeline import check_compatible, repair
    from hcnr_jax.stats import StatsOptions

    base_m, ft = load_pretrained(base), load_pretrained(finetuned)
    check_compatible(base_m, ft)
    dev = load_dev_data(dev_honesty, dev_task, ft, cfg.max_length)
    ref = dev_score(base_m.params, ft, dev), dev_score(ft.params, ft, dev)
    announce = announce or (lambda line: print(line, flush=True))
    options = stats_options or StatsOptions()
    results, scores = {}, {}
    with tempfile.TemporaryDirectory(prefix="hcnr_choose_") as tmp:
        options = dataclasses.replace(options, cache_dir=options.cache_dir or tmp)
        for v in values:
            announce(f"--choose: repairing at {setting} = {v:g}")
            results[v] = repair(base_m, ft, honesty_data, task_data, cfg.override(**{setting: v}),
                                stats_options=options)
            scores[v] = dev_score(results[v].model.params, ft, dev)
            # The rule's floor depends on base and fine-tuned only, so the choice among the values so
            # far is final for them: only its model is kept (one repaired model in memory at a time).
            best = choose(scores, *ref)["chosen"]
            results = {best: results[best]}
    choice = choose(scores, *ref)
    choice.update(setting=setting, dev_honesty=dev_honesty, dev_task=dev_task)
    announce("\n".join(describe(choice, setting)))
    chosen = results[choice["chosen"]]
    chosen.report["choice"] = choice
    return chosen


def merge_choosing(base: Pretrained, finetuned: Pretrained, alphas: Sequence[float], dev_honesty: str | None,
                   dev_task: str | None, announce: Callable[[str], None] | None = None
                   ) -> tuple[Params, float, dict[str, Any] | None]:
    """``hcnr merge --alpha A[,A...]``: the `merge` of the two models at ``alpha``, or, with several
    values, at the one the development rule chooses on ``dev_honesty`` / ``dev_task``. Returns the
    merged parameters, the alpha and the choice (None for a single value); ``announce`` gets the
    choice's table."""
    choice = None
    if len(alphas) > 1:
        dev = load_dev_data(dev_honesty, dev_task, finetuned)
        scores = {a: dev_score(merge(base.params, finetuned.params, a), finetuned, dev) for a in alphas}
        choice = choose(scores, dev_score(base.params, finetuned, dev), dev_score(finetuned.params, finetuned, dev))
        (announce or print)("\n".join(describe(choice, "alpha")))
    alpha = choice["chosen"] if choice else alphas[0]
    return merge(base.params, finetuned.params, alpha), alpha, choice
