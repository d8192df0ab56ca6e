"""Hand labels of refusal-benchmark responses and the refusal detectors' agreement with them.

``python -m hcnr_jax.eval.labels [--embedding] [--json PATH]`` prints, against
``hcnr_jax/bundled/labels/refusal_labels.jsonl``, precision and recall of class "refused" for every
rule set (and the default rules + MiniLM similarity with ``--embedding``) per source model (``smollm2``
= SmolLM2-135M-Instruct as shipped, ``m0`` / ``m1`` / ``hcnr`` / ``rait`` = the trained models of
experiments/reproduce.py), on the trained models together and on all labels, with 95% Wilson score
intervals and the counts (TP, FP, FN, n); then the default rules per subset: development / held-out
half, source model, system prompt (SmolLM2 rows), benchmark. ``--json PATH`` writes the tables.

Development / held-out halves: a fixed seeded hash of each record's id (:func:`half_of`). Rules
are changed looking only at the development half's errors; the held-out half measures them.
The trained-model labels (``source_model`` set) were added after the last rule change and are held
out as a whole (docs/refusal_detectors.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hcnr_jax.data.jsonl import read_jsonl
from hcnr_jax.embedded import LABELS_FILE
from hcnr_jax.errors import DataError
from hcnr_jax.eval import report
from hcnr_jax.eval.metrics import CONFIDENCE, detector_agreement, refused_counts
from hcnr_jax.eval.refusal import VERDICTS, RefusalDetector
from hcnr_jax.io import portable_path

LABELS = LABELS_FILE
SPLIT_SEED = 20240611  # fixed: changing it would let rule changes have seen the held-out half
HALVES = ("development", "held_out")
# Source models, ``source_model`` field (absent: "smollm2", the SmolLM2-135M-Instruct responses).
# The last six: the evidence rows of experiments/evidence.py (experiments/label_evidence.py).
MODELS = ("smollm2", "m0", "m1", "hcnr", "rait", "hcnr_s0", "hcnr_chosen", "merge", "rait_gold", "dpo", "layers")
TRAINED = MODELS[1:]
REQUIRED = ("benchmark", "id", "question", "response", "label")
RULE_SETS = ("default", "selfaware", "alignment_for_honesty", "unknownbench")


def model_of(row: dict) -> str:
    """The model that wrote a labelled response: its ``source_model`` field, "smollm2" when absent."""
    return row.get("source_model", "smollm2")


def source_of(row: dict) -> str:
    """The generation setting of a labelled response: for SmolLM2 rows its ``system`` field ("none"
    when absent), for trained-model rows the model (``source_model``)."""
    m = model_of(row)
    return row.get("system", "none") if m == "smollm2" else m


def key_of(row: dict) -> tuple[str, str, str, str]:
    """``(benchmark, id, system, source_model)``: unique in the labels file."""
    return row["benchmark"], row["id"], row.get("system", "none"), model_of(row)


def load_labels(path: str | Path = LABELS) -> list[dict]:
    """Records ``{benchmark, id, question, unanswerable, response, label[, system][, source_model]}``.

    ``system`` names the system prompt the response was generated with (absent: none),
    ``source_model`` the model (absent: SmolLM2-135M-Instruct); the same question can be labelled
    under several (see hcnr_jax/bundled/labels/README.md). Raises DataError on a missing field, a
    label not in VERDICTS, an unknown ``source_model`` or a repeated :func:`key_of`."""
    rows = [r for _, r in read_jsonl(path)]
    seen: dict[tuple, int] = {}
    for i, r in enumerate(rows, 1):
        missing = [f for f in REQUIRED if f not in r]
        if missing:
            raise DataError(f"{path}:{i}: missing field(s) {', '.join(missing)}")
        if r.get("label") not in VERDICTS:
            raise DataError(f"{path}:{i}: label {r.get('label')!r} is not one of {VERDICTS}")
        if model_of(r) not in MODELS:
            raise DataError(f"{path}:{i}: source_model {model_of(r)!r} is not one of {MODELS}")
        k = key_of(r)
        if k in seen:
            raise DataError(f"{path}:{i}: {k} already labelled on line {seen[k]}")
        seen[k] = i
    return rows


def half_of(row: dict, seed: int = SPLIT_SEED) -> str:
    """"development" or "held_out", by a seeded hash of ``benchmark/id`` (stable across runs and files)."""
    h = hashlib.sha256(f"{seed}:{row['benchmark']}/{row['id']}".encode()).digest()
    return HALVES[h[0] & 1]


def halves(rows: list[dict], seed: int = SPLIT_SEED) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {h: [] for h in HALVES}
    for r in rows:
        out[half_of(r, seed)].append(r)
    return out


def agreement(rows: list[dict], detector: RefusalDetector) -> dict[str, Any]:
    pred = [d.verdict for d in detector.detect_all([r["response"] for r in rows], [r["question"] for r in rows])]
    return detector_agreement([r["label"] for r in rows], pred)


def model_groups(rows: list[dict]) -> dict[str, list[int]]:
    """Row indices per source model (those present, in MODELS order), the trained models together
    ("trained") and all rows ("all")."""
    by = {m: [i for i, r in enumerate(rows) if model_of(r) == m] for m in MODELS}
    out = {m: idx for m, idx in by.items() if idx}
    out["trained"] = [i for i, r in enumerate(rows) if model_of(r) in TRAINED]
    out["all"] = list(range(len(rows)))
    return out


def verdicts(rows: list[dict], detector: RefusalDetector) -> list[str]:
    return [d.verdict for d in detector.detect_all([r["response"] for r in rows], [r["question"] for r in rows])]


def pr_table(rows: list[dict], predictions: dict[str, Sequence[str]],
             groups: dict[str, list[int]] | None = None) -> list[dict[str, Any]]:
    """One row per (detector, group): `hcnr_jax.eval.metrics.refused_counts` of the group's rows.

    ``predictions``: detector name -> verdicts of all ``rows``; ``groups``: name -> row indices
    (default :func:`model_groups`)."""
    groups = model_groups(rows) if groups is None else groups
    hand = [r["label"] for r in rows]
    out = []
    for det, pred in predictions.items():
        for g, idx in groups.items():
            c = refused_counts([hand[i] for i in idx], [pred[i] for i in idx])
            out.append(dict(detector=det, group=g, **c))
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) else v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--labels", default=str(LABELS))
    ap.add_argument("--embedding", action="store_true", help="also the default rules + MiniLM similarity")
    ap.add_argument("--json", metavar="PATH", help="write the tables to PATH (JSON; nan -> null)")
    args = ap.parse_args(argv)
    rows = load_labels(args.labels)
    dets = {r: RefusalDetector(rules=r) for r in RULE_SETS}
    if args.embedding:
        dets["default+embedding"] = RefusalDetector(embedding=True)
    preds = {name: verdicts(rows, d) for name, d in dets.items()}
    hand = [r["label"] for r in rows]
    counts = {v: sum(h == v for h in hand) for v in VERDICTS}
    per_model = {m: n for m in MODELS if (n := sum(model_of(r) == m for r in rows))}
    print(f"{len(rows)} hand-labelled responses:", json.dumps(counts), "by source model:", json.dumps(per_model))
    summary = {name: detector_agreement(hand, pred) for name, pred in preds.items()}
    print(report.rules_table(summary))
    print(f"class \"refused\" by source model ({CONFIDENCE:.0%} Wilson score intervals; precision = TP / (TP + FP), "
          "recall = TP / (TP + FN)):")
    table = pr_table(rows, preds)
    print(report.detector_table(table))
    print("default confusion (hand -> detector):", json.dumps(summary["default"]["confusion"]))
    idx = {f"half={h}": [i for i, r in enumerate(rows) if half_of(r) == h] for h in HALVES}
    idx |= {f"model={m}": [i for i, r in enumerate(rows) if model_of(r) == m] for m in per_model}
    smol = [i for i, r in enumerate(rows) if model_of(r) == "smollm2"]
    idx |= {f"system={s}": [i for i in smol if source_of(rows[i]) == s]
            for s in sorted({source_of(rows[i]) for i in smol})}
    idx |= {f"benchmark={b}": [i for i, r in enumerate(rows) if r["benchmark"] == b]
            for b in sorted({r["benchmark"] for r in rows})}
    print("default rules by subset:")
    subsets = [dict(subset=name, n_refused=sum(hand[i] == "refused" for i in ii),
                    **detector_agreement([hand[i] for i in ii], [preds["default"][i] for i in ii]))
               for name, ii in idx.items()]
    print(report.subsets_table(subsets))
    if args.json:
        out = dict(labels=portable_path(args.labels), n=len(rows), label_counts=counts, source_models=per_model,
                   confidence=CONFIDENCE, split_seed=SPLIT_SEED, summary=summary, by_model=table,
                   default_by_subset=subsets)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(_jsonable(out), indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
