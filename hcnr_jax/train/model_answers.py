"""A model's own answers for the honesty-data recipes (`hcnr_jax.data.recipes`): greedy and sampled
generation over the questions a recipe uses, kept by question id in an answers file (so several recipes
share one generation pass), and the recipe's records built from them (`honesty_records`).

The data package holds the recipes as pure functions of the answers; this module is the step that
runs a model to get them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hcnr_jax.data import recipes as R
from hcnr_jax.errors import DataError
from hcnr_jax.io import atomic_write_text, portable_path
from hcnr_jax.source import ModelSource


@dataclass(frozen=True)
class AnswerSettings:
    """How the answers are generated: the model (a source as in ``hcnr convert``), ``samples``
    sampled answers per question at ``temperature`` (top-p 1, seeded), ``max_new_tokens`` each,
    ``batch_size`` prompts per generation batch (greedy: the default decoding)."""

    model: str
    samples: int = 10
    temperature: float = 1.0
    seed: int = 0
    max_new_tokens: int = 32
    batch_size: int = 16

    def key(self) -> dict[str, Any]:
        """The settings an answers file records: answers made with others are not reused."""
        return dict(model=ModelSource.parse(self.model).describe(portable_path), samples=self.samples,
                    temperature=self.temperature, seed=self.seed, max_new_tokens=self.max_new_tokens)


class AnswersFile:
    """The model's greedy and sampled answers by question id, with the settings that produced them,
    kept in the JSON file ``path`` (None: in memory only). A file made with other settings is a
    `DataError` naming the file and the setting."""

    def __init__(self, path: str | Path | None, settings: AnswerSettings) -> None:
        self.path = Path(path) if path else None
        self.settings = settings.key()
        self.greedy: dict[str, str] = {}
        self.sampled: dict[str, list[str]] = {}
        if self.path is None or not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            old, greedy, sampled = doc["settings"], doc["greedy"], doc["sampled"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{self.path}: not an answers file of hcnr honesty-data ({e})") from None
        changed = [k for k, v in self.settings.items() if old.get(k) != v]
        if changed:
            raise DataError(f"{self.path}: holds answers made with other settings ("
                            + ", ".join(f"{k} {old.get(k)!r}, now {self.settings[k]!r}" for k in changed)
                            + "); use another file")
        if not (isinstance(greedy, dict) and isinstance(sampled, dict)
                and all(isinstance(v, str) for v in greedy.values())
                and all(isinstance(v, list) and len(v) == settings.samples for v in sampled.values())):
            raise DataError(f"{self.path}: 'greedy' must map ids to strings and 'sampled' ids to "
                            f"lists of {settings.samples} strings")
        self.greedy, self.sampled = greedy, sampled

    def save(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, json.dumps(dict(settings=self.settings, greedy=self.greedy,
                                                         sampled=self.sampled), ensure_ascii=False))


def generate_answers(model: Any, prompts: list[str], settings: AnswerSettings, copies: int,
                     sample: bool) -> list[list[str]]:
    """``copies`` answers per prompt (each prompt repeated; every index has its own random stream)."""
    from hcnr_jax.generation import generate

    flat = [p for p in prompts for _ in range(copies)]
    if not flat:
        return [[] for _ in prompts]
    # Greedy decoding is generate's default.
    kw = dict(temperature=settings.temperature, top_p=1.0, seed=settings.seed) if sample else {}
    out = generate(model, flat, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                   progress="sampled answers" if sample else "greedy answers", **kw)
    return [out[i * copies : (i + 1) * copies] for i in range(len(prompts))]


def fill(cache: AnswersFile, recipe: str, rows: Sequence[dict], settings: AnswerSettings) -> None:
    """Generate the answers ``recipe`` uses that ``cache`` lacks (the model is loaded only then) and
    save the cache."""
    from hcnr_jax.pretrained import load_pretrained

    todo = R.questions_to_answer(recipe, rows)
    need_greedy = [i for i in todo if recipe in R.NEEDS_GREEDY and rows[i]["id"] not in cache.greedy]
    need_sampled = [i for i in todo if recipe in R.NEEDS_SAMPLES and rows[i]["id"] not in cache.sampled]
    if not (need_greedy or need_sampled):
        return
    model = load_pretrained(settings.model)
    for i, g in zip(need_greedy, generate_answers(model, [rows[i]["question"] for i in need_greedy], settings, 1,
                                                  sample=False), strict=True):
        cache.greedy[rows[i]["id"]] = g[0]
    # Sampling streams are indexed by position in the prompt list: a question's samples depend on
    # which others are generated with it, so the cache (not a rerun) is what makes them reusable.
    for i, s in zip(need_sampled, generate_answers(model, [rows[i]["question"] for i in need_sampled], settings,
                                                   settings.samples, sample=True), strict=True):
        cache.sampled[rows[i]["id"]] = s
    cache.save()


def honesty_records(recipe: str, rows: Sequence[dict], settings: AnswerSettings, cache: AnswersFile, *,
                    tau: float = 0.1, idk: str = R.A4H_IDK,
                    refused: Callable[[str, str], bool] | None = None) -> tuple[list[dict], int]:
    """(records, rows dropped) of a model-based recipe: the answers it needs (from ``cache``, the
    missing ones generated and added), then `hcnr_jax.data.recipes.build`. ``refused(answer,
    question)``: the refusal test dpo-pairs drops unknown questions by."""
    fill(cache, recipe, rows, settings)
    greedy = [cache.greedy.get(r["id"], "") if recipe in R.NEEDS_GREEDY else "" for r in rows]
    sampled = [cache.sampled.get(r["id"], []) if recipe in R.NEEDS_SAMPLES else [] for r in rows]
    return R.build(recipe, rows, greedy, sampled, tau=tau, idk=idk, refused=refused)
