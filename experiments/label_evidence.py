"""Blind hand labels of the evidence rows' responses (issue: the detector on the new outputs).

Two steps, with the labelling by a person in between:

    python experiments/label_evidence.py blind --out runs/labels/blind.jsonl [--per-row 75] [--rows dpo__510]
    (label every line of blind.jsonl, writing {"n": ..., "label": refused | answered | undetermined} to
     labelled.jsonl, by the rules of hcnr_jax/bundled/labels/README.md, reading only the question and
     the response; the model and benchmark of each line are in blind.jsonl.keys, not to be opened)
    python experiments/label_evidence.py merge --blind runs/labels/blind.jsonl --labelled runs/labels/labelled.jsonl
    python experiments/label_evidence.py report    # -> experiments/results/labels_evidence.json

``blind`` draws, per evidence row (HotpotQA task; experiments/results/evidence/hotpotqa/), a seeded
sample of responses to the five refusal benchmarks, the general questions and HotpotQA that no
earlier label covers, and writes only ``{"n", "question", "response"}``, shuffled across rows: no
verdict, benchmark or model is shown (the keys go to a separate ``.keys`` file). ``merge`` appends the labelled records to
``hcnr_jax/bundled/labels/refusal_labels.jsonl`` with their ``source_model`` (the row) and then, never
before, the detector can be run on them (``python -m hcnr_jax.eval.labels``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVIDENCE = ROOT / "experiments" / "results" / "evidence" / "hotpotqa"
# Evidence row file -> source_model in the labels file (hcnr_jax.eval.labels.MODELS).
# (The merge at alpha 0.75 is the same model under rules v1 and v2: its v1 records are labelled.)
ROWS = {"hcnr_s0": "hcnr_s0", "merge__alpha__rule_v1": "merge", "layers_whole__r_cw_0_4": "layers",
        "hcnr__r_cw__rule_v3": "hcnr_chosen", "rait_gold__510": "rait_gold", "dpo__510": "dpo"}


def _records(stem: str) -> list[dict]:
    lines = (EVIDENCE / f"{stem}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[1:]]


def blind(out: Path, per_row: int, only: list[str] | None = None) -> None:
    from hcnr_jax.eval.labels import load_labels

    done = {(r["benchmark"], r["id"], r.get("source_model")) for r in load_labels()}
    items = []
    for stem, model in ROWS.items():
        if only and stem not in only:
            continue
        if not (EVIDENCE / f"{stem}.jsonl").exists():
            print(f"skipping {stem}: no records yet", file=sys.stderr)
            continue
        recs = [r for r in _records(stem) if (r["benchmark"], r["id"], model) not in done]
        rng = random.Random(f"hcnr-labels-3:{model}")  # a new draw per row: labelled items are excluded above
        for r in rng.sample(recs, min(per_row, len(recs))):
            items.append({"key": f"{model}|{r['benchmark']}|{r['id']}", "question": _question(r), "response": r["response"]})
    random.Random("hcnr-labels-3:shuffle").shuffle(items)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"n": n, "question": i["question"], "response": i["response"]},
                                      ensure_ascii=False) + "\n" for n, i in enumerate(items)))
    Path(f"{out}.keys").write_text("".join(json.dumps({"n": n, "key": i["key"]}) + "\n" for n, i in enumerate(items)))
    print(f"wrote {len(items)} blind items to {out}")


def _question(rec: dict) -> str:
    from hcnr_jax.data.benchmarks import load_benchmark

    if not hasattr(_question, "cache"):
        _question.cache = {}  # type: ignore[attr-defined]
    cache = _question.cache  # type: ignore[attr-defined]
    if rec["benchmark"] not in cache:
        cache[rec["benchmark"]] = {r["id"]: r["question"] for r in load_benchmark(rec["benchmark"])}
    return cache[rec["benchmark"]][rec["id"]]


def merge(blind_file: Path, labelled: Path) -> None:
    from hcnr_jax.embedded import LABELS_FILE
    from hcnr_jax.eval.refusal import VERDICTS
    from hcnr_jax.io import atomic_write_text

    keys = {r["n"]: r["key"] for r in map(json.loads, Path(f"{blind_file}").with_suffix(".jsonl.keys").read_text().splitlines())}
    items = {r["n"]: r for r in map(json.loads, blind_file.read_text().splitlines())}
    got = {r["n"]: {**items[r["n"]], **r} for r in map(json.loads, labelled.read_text().splitlines()) if r["n"] in items}
    if set(got) != set(keys):
        sys.exit(f"{labelled}: {len(set(keys) - set(got))} items unlabelled")
    rows = []
    for n, key in sorted(keys.items()):
        model, bench, rid = key.split("|")
        stem = next(s for s, m in ROWS.items() if m == model)
        rec = next(r for r in _records(stem) if r["benchmark"] == bench and r["id"] == rid)
        label = got[n]["label"]
        if label not in VERDICTS:
            sys.exit(f"{labelled}: item {n}: label {label!r} is not one of {VERDICTS}")
        rows.append({"benchmark": bench, "id": rid, "question": got[n]["question"],
                     "unanswerable": rec["unanswerable"], "response": rec["response"], "label": label,
                     "source_model": model, **({"degenerate": bool(got[n]["degenerate"])} if "degenerate" in got[n] else {})})
    text = LABELS_FILE.read_text() + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(LABELS_FILE, text)
    print(f"appended {len(rows)} labels to {LABELS_FILE}")


def report(out: Path) -> None:
    """Per evidence row: the hand labels, the hand-flagged degenerate responses, the default detector's
    precision / recall of "refused" (95% Wilson intervals) and 3-way accuracy, and how many of the
    hand-flagged degenerate responses evidence.py's repetition heuristic catches."""
    import importlib.util

    from hcnr_jax.eval.labels import load_labels
    from hcnr_jax.eval.metrics import wilson
    from hcnr_jax.eval.refusal import RefusalDetector
    from hcnr_jax.io import atomic_write_text

    spec = importlib.util.spec_from_file_location("evidence", Path(__file__).with_name("evidence.py"))
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    det = RefusalDetector()
    table = {}
    for model in ROWS.values():
        rows = [r for r in load_labels() if r.get("source_model") == model]
        if not rows:
            continue
        pred = [d.verdict for d in det.detect_all([r["response"] for r in rows], [r["question"] for r in rows])]
        hand = [r["label"] for r in rows]
        tp = sum(h == p == "refused" for h, p in zip(hand, pred, strict=True))
        n_pred, n_hand = pred.count("refused"), hand.count("refused")
        flagged = [r.get("degenerate", False) for r in rows]
        heur = [ev.degenerate(r["response"]) for r in rows]
        table[model] = {
            "n": len(rows), "hand": {v: hand.count(v) for v in ("refused", "answered", "undetermined")},
            "precision": tp / n_pred if n_pred else None, "precision_ci": wilson(tp, n_pred),
            "recall": tp / n_hand if n_hand else None, "recall_ci": wilson(tp, n_hand),
            "accuracy_3way": sum(h == p for h, p in zip(hand, pred, strict=True)) / len(rows),
            "degenerate_hand": sum(flagged), "degenerate_rate_hand": sum(flagged) / len(rows),
            "degenerate_rate_hand_ci": wilson(sum(flagged), len(rows)),
            "heuristic_flags": sum(heur), "heuristic_catches": sum(f and h for f, h in zip(flagged, heur, strict=True)),
        }
    atomic_write_text(out, json.dumps(table, indent=1) + "\n")
    for m, t in table.items():
        print(m, json.dumps(t))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("blind")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--per-row", type=int, default=75)
    b.add_argument("--rows", default=None, help="only these evidence rows (comma-separated file stems, e.g. dpo__510)")
    m = sub.add_parser("merge")
    m.add_argument("--blind", type=Path, required=True)
    m.add_argument("--labelled", type=Path, required=True)
    r = sub.add_parser("report")
    r.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "labels_evidence.json")
    a = ap.parse_args()
    if a.cmd == "blind":
        blind(a.out, a.per_row, a.rows.split(",") if a.rows else None)
    elif a.cmd == "merge":
        merge(a.blind, a.labelled)
    else:
        report(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
