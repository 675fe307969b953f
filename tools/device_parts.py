"""Helpers of ``tools/device_check.sh``: the checks that read other commands' output, and the tiny HF
fixture. Only the standard library at the top: ``losses`` and ``eval`` start in milliseconds (a
Python start with torch costs 15-30 s on the lent machine); ``hf-fixture`` imports torch and
transformers itself.

    python3 tools/device_parts.py losses --tol 2e-3 FULL.log FULL2.log PART1.log PART2.log
    python3 tools/device_parts.py eval RESULTS.json
    python3 tools/device_parts.py hf-fixture DIR
    python3 tools/device_parts.py scripts FILE.py ...   # --dry-run: several scripts' __main__, one start

Each prints one line for the check's SUMMARY (prefix ``resume:``, ``eval:``, ``fixture:``; ``scripts``
ends each script with ``FILE: passed`` or ``FILE: FAILED``) and exits 1 when the check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import runpy
import sys
import traceback
from pathlib import Path

STEP = re.compile(r"step (\d+)/(\d+)  loss (\S+)")
STEP_TIME = re.compile(r"step \d+/\d+  loss .*  step ([0-9.]+)s")
RESUMED = re.compile(r"resumed from \S+ at step (\d+)")


def read_losses(log: str) -> tuple[dict[int, float], int, int | None]:
    """(step -> loss, train.steps, the step it resumed from or None) out of a v2pe-train log."""
    text = Path(log).read_text(errors="replace")
    losses, total = {}, 0
    for step, steps, loss in STEP.findall(text):
        losses[int(step)] = float(loss)
        total = int(steps)
    m = RESUMED.search(text)
    return losses, total, int(m.group(1)) if m else None


def compare_losses(full: str, again: str, parts: list[str], tol: float) -> tuple[bool, str]:
    """The stopped-and-resumed run (``parts``, in order) against the uninterrupted ``full`` run, step
    by step; ``again`` (a second uninterrupted run) measures how far two identical runs differ."""
    ref, total, _ = read_losses(full)
    ref2, _, _ = read_losses(again)
    got: dict[int, float] = {}
    problems, resumed_at = [], []
    for i, log in enumerate(parts):
        losses, _, resumed = read_losses(log)
        if i and resumed is None:
            problems.append(f"{Path(log).name} did not resume")
        if i and resumed is not None:
            resumed_at.append(resumed)
            if resumed != max(got, default=0):
                problems.append(f"resumed at step {resumed}, the stopped run ended at {max(got, default=0)}")
        if set(losses) & set(got):
            problems.append(f"steps {sorted(set(losses) & set(got))} ran twice")
        got.update(losses)
    want = list(range(1, total + 1)) if total else []
    if not want or sorted(ref) != want:
        problems.append(f"the uninterrupted run logged steps {sorted(ref)}")
    if sorted(got) != want:
        problems.append(f"stopped + resumed logged steps {sorted(got)}, not 1..{total}")
    if len(parts) > 1 and len(resumed_at) != len(parts) - 1:
        problems.append("no resume")
    steps = [s for s in want if s in ref and s in got]
    bad = [s for s in steps if not math.isfinite(got[s]) or not math.isfinite(ref[s])]
    diff = max((abs(got[s] - ref[s]) for s in steps if s not in bad), default=float("nan"))
    noise = max((abs(ref2[s] - ref[s]) for s in steps if s in ref2), default=float("nan"))
    exact = sum(got[s] == ref[s] for s in steps)
    times = sorted(float(t) for t in STEP_TIME.findall(Path(full).read_text(errors="replace")))
    if bad:
        problems.append(f"non-finite losses at steps {bad}")
    if not steps or not diff <= tol:
        problems.append(f"max |loss difference| {diff:.2e} > tolerance {tol:g}")
    if not noise <= tol:
        problems.append(f"two uninterrupted runs differ by {noise:.2e} > tolerance {tol:g}: the comparison cannot judge")
    line = (f"resume: {total} steps, stopped after {resumed_at[0] if resumed_at else '?'} and resumed: max |loss - "
            f"uninterrupted| {diff:.2e} (tolerance {tol:g}; {exact}/{len(steps)} steps equal at the log's 5 decimals); "
            f"two uninterrupted runs differ by {noise:.2e}; losses {ref.get(1, float('nan')):.4f} -> "
            f"{ref.get(total, float('nan')):.4f}; median step {times[len(times) // 2] if times else float('nan'):.2f} s")
    if problems:
        line += "; PROBLEMS: " + "; ".join(problems)
    return not problems, line


def summarize_eval(results: str) -> tuple[bool, str]:
    """Samples, deltas, mean teacher-forced accuracy and log-prob out of v2pe-eval's results.json."""
    data = json.loads(Path(results).read_text())
    records = data["records"] if isinstance(data, dict) else data
    tf = [r for r in records if r.get("tf_logp") is not None]
    ids = {r["id"] for r in records}
    deltas = sorted({str(r.get("delta")) for r in records})
    finite = [r for r in tf if math.isfinite(r["tf_logp"])]
    ok = bool(tf) and len(finite) == len(tf)
    acc = sum(r["tf_acc"] for r in tf) / max(len(tf), 1)
    logp = sum(r["tf_logp"] for r in finite) / max(len(finite), 1)
    line = (f"eval: {len(ids)} samples x {len(deltas)} delta(s) ({', '.join(deltas)}), teacher-forced: "
            f"{len(tf)} records, accuracy {acc:.3f}, mean answer log-prob {logp:.3f}"
            f"{'' if ok else f'; PROBLEMS: {len(tf) - len(finite)} non-finite log-probs of {len(tf)}'}")
    return ok, line


def hf_fixture(out: str) -> tuple[bool, str]:
    """transformers' own InternVL (tiny, random weights, saved by save_pretrained): what ``v2pe-convert
    import-hf --verify`` compares the imported checkpoint's logits with, in fp32."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from v2pe_megatron.testing.hf_fixtures import native_checkpoint

    native_checkpoint(out)
    files = sorted(p.name for p in Path(out).iterdir())
    return True, f"fixture: transformers InternVL (2-layer Qwen2, 2-layer ViT) in {out}: {', '.join(files)}"


def run_scripts(files: list[str]) -> tuple[bool, str]:
    """Each file's ``__main__`` in turn in this one process (a Python start with torch saved per file);
    a failing one does not stop the others."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    failed = []
    for f in files:
        print(f"----- {f}", flush=True)
        try:
            runpy.run_path(f, run_name="__main__")
        except SystemExit as e:
            if e.code not in (None, 0):
                failed.append(f)
        except Exception:  # noqa: BLE001  (reported, and the next script still runs)
            traceback.print_exc()
            failed.append(f)
        print(f"{f}: {'FAILED' if f in failed else 'passed'}", flush=True)
    return not failed, f"scripts: {len(files) - len(failed)} of {len(files)} passed"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    lo = sub.add_parser("losses", help="stopped + resumed run against an uninterrupted one")
    lo.add_argument("--tol", type=float, required=True, help="largest |loss difference| per step")
    lo.add_argument("full", help="log of the uninterrupted run")
    lo.add_argument("again", help="log of a second uninterrupted run (run-to-run noise)")
    lo.add_argument("parts", nargs="+", help="logs of the stopped run and of its resumes, in order")
    ev = sub.add_parser("eval", help="summary of v2pe-eval's results.json")
    ev.add_argument("results")
    fx = sub.add_parser("hf-fixture", help="write the tiny transformers InternVL")
    fx.add_argument("out")
    sc = sub.add_parser("scripts", help="run several scripts' __main__ in this process")
    sc.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    if args.cmd == "losses":
        ok, line = compare_losses(args.full, args.again, args.parts, args.tol)
    elif args.cmd == "eval":
        ok, line = summarize_eval(args.results)
    elif args.cmd == "scripts":
        ok, line = run_scripts(args.files)
    else:
        ok, line = hf_fixture(args.out)
    print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
