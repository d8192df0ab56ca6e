"""Ctrl-C during `hcnr repair` on SmolLM2, at moments spread over loading, compilation and the
statistics: does every run stop with exit 130, no crash, nothing left behind, and does a rerun
resume from the saved progress?

    python experiments/interrupt_check.py [--delays 8,16,24,32,40,48,56] [--out experiments/results]

Each trial starts `hcnr repair` (bundled M0 -> M1, 64 + 64 calibration samples, a fresh
`--cache-dir`), sends one SIGINT after the delay, and waits up to ``--grace`` seconds for it to
stop. A run still going then gets a second SIGINT (and is counted as not stopping on the first).
The last trial's cache is then reused by an uninterrupted run, which must report a resume when the
interrupt landed in the statistics. Writes ``interrupt_check.{json,md}``.

``--warm KINDS``: first one uninterrupted repair fills a cache; each trial starts with that cache's
entries of these kinds (e.g. ``fisher``, so that the delays land in the Hessian, the solve and the
write instead). Writes ``interrupt_check_warm.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from reproduce import models


def repair_cmd(out: Path, cache: Path) -> list[str]:
    m = models()
    return ["hcnr", "repair", "--base", m["m0"], "--finetuned", m["m1"], "--limit", "64", "--out", str(out),
            "--cache-dir", str(cache), "--no-plots"]


def trial(delay: float, work: Path, grace: float) -> dict:
    out, cache = work / "out", work / "cache"
    cmd = repair_cmd(out, cache)
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    log = work / "stderr.txt"
    with log.open("w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        t0 = time.perf_counter()
        try:
            p.wait(timeout=delay)
            sent = None  # finished before the signal
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGINT)
            sent = time.perf_counter()
        second = False
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            second = True
            p.send_signal(signal.SIGINT)
            p.wait(timeout=grace)
        end = time.perf_counter()
    text = log.read_text(errors="replace")
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    leftovers = sorted(p_.name for p_ in work.iterdir() if p_.name.startswith(".") or p_.name == "out")
    leftovers += sorted(p_.name for p_ in cache.glob("*.lock")) if cache.exists() else []
    return {
        "delay_s": delay, "exit": p.returncode, "stop_s": None if sent is None else round(end - sent, 1),
        "wall_s": round(end - t0, 1), "second_ctrl_c": second,
        "crash": any(s in text for s in ("Segmentation fault", "Fatal Python error", "core dumped")),
        "traceback": "Traceback" in text,
        "message": next((ln[:240] for ln in reversed(lines) if ln.startswith("hcnr repair:")), lines[-1][:240] if lines else ""),
        "saved": "progress saved" in text, "leftovers": leftovers,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--delays", default="8,16,24,32,40,48,56", help="seconds from start to SIGINT, one trial each")
    ap.add_argument("--grace", type=float, default=120.0, help="seconds to wait for a stop before a second SIGINT")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--warm", default="", help="cache entry kinds each trial starts with (e.g. fisher)")
    args = ap.parse_args()
    rows = []
    root = Path(tempfile.mkdtemp(prefix="hcnr-interrupt-"))
    warm = [k for k in args.warm.split(",") if k]
    try:
        if warm:
            subprocess.run(repair_cmd(root / "warm" / "out", root / "warm" / "cache"), check=True,
                           capture_output=True)
        for i, d in enumerate(float(x) for x in args.delays.split(",")):
            work = root / f"t{i}"
            work.mkdir()
            if warm:
                (work / "cache").mkdir()
                for kind in warm:
                    for f in (root / "warm" / "cache").glob(f"{kind}-*.safetensors"):
                        shutil.copy(f, work / "cache" / f.name)
            rows.append(trial(d, work, args.grace))
            rows[-1]["message"] = rows[-1]["message"].replace(str(work), "WORK")  # no temp paths in the report
            print(json.dumps(rows[-1]), flush=True)
        # Resume: the last interrupted trial's cache, run to the end without interruption.
        stopped = [i for i, r in enumerate(rows) if r["exit"] == 130] or [len(rows) - 1]
        last = root / f"t{stopped[-1]}"
        t0 = time.perf_counter()
        res = subprocess.run(repair_cmd(last / "out", last / "cache"), capture_output=True, text=True)
        resume = {"exit": res.returncode, "wall_s": round(time.perf_counter() - t0, 1),
                  "resumed": "resumed from" in res.stderr,
                  "resume_lines": [ln.strip().replace(str(last), "WORK") for ln in res.stderr.splitlines()
                                   if "resumed from" in ln or "cache hit" in ln]}
        print(json.dumps(resume), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    # A run that finished before its signal was never interrupted: it is listed, not counted. One whose
    # signal came during its last step (writing the output) completes it: exit 0, a complete output.
    hit = [r for r in rows if r["stop_s"] is not None]
    last_step = [r for r in hit if r["exit"] == 0 and not r["crash"] and not r["traceback"]]
    ok = sum(r["exit"] == 130 and not r["crash"] and not r["traceback"] and not r["leftovers"] and not r["second_ctrl_c"]
             for r in hit)
    command = "python experiments/interrupt_check.py --delays " + args.delays + (f" --warm {args.warm}" if warm else "")
    report = {"command": command, "trials": rows,
              "interrupted": len(hit), "clean_stops": ok, "completed_in_last_step": len(last_step), "resume": resume}
    out = Path(args.out)
    name = "interrupt_check_warm" if warm else "interrupt_check"
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    md = ["# Ctrl-C during `hcnr repair` (SmolLM2, bundled M0 -> M1, 64 + 64 samples)"
          + (f", each trial starting with cached {args.warm} statistics" if warm else ""), "",
          f"`{report['command']}`: the signal reached a running repair in {len(hit)} trials. {ok} stopped cleanly "
          "at the next step boundary on the first Ctrl-C (exit 130, no crash, no traceback, nothing left behind)"
          + (f"; in {len(last_step)} it came during the last step (writing the output), which completed (exit 0, "
             "the whole output written)" if last_step else "")
          + (f". {len(rows) - len(hit)} finished before its signal" if len(hit) < len(rows) else "") + ".", "",
          "| SIGINT at (s) | exit | stopped after (s) | 2nd Ctrl-C needed | crash | progress saved | leftovers | message |",
          "|---:|---:|---:|---|---|---|---|---|"]
    md += [f"| {r['delay_s']:.0f} | {r['exit']} | {r['stop_s']} | {'yes' if r['second_ctrl_c'] else 'no'} | "
           f"{'yes' if r['crash'] else 'no'} | {'yes' if r['saved'] else 'no'} | {', '.join(r['leftovers']) or '-'} | "
           f"`{r['message'].replace('|', '/')}` |" for r in rows]
    md += ["", f"Rerun on the last interrupted trial's cache: exit {resume['exit']} in {resume['wall_s']} s; "
           + ("; ".join(resume["resume_lines"]) or "no statistics reused") + ".", ""]
    (out / f"{name}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
