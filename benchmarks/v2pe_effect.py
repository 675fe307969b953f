"""The V2PE effect, end to end in miniature: train with and without V2PE, evaluate far beyond the
trained length (docs/v2pe.md, "The V2PE effect").

Run: ``.venv/bin/python benchmarks/v2pe_effect.py --seed 0 --out runs/effect/seed0`` (``make effect``).

1. data: needle training samples of the training split (``data.needles``, ``split="train"``: no
   needle of an evaluation set), written in InternVL's format, every one checked to fit the recipe's
   ``data.seq_length`` with the loader's own tokenization and tiling;
2. training: ``v2pe-train`` on ``recipes/effect_baseline_cpu.yaml`` (every image at delta 1) and on
   ``recipes/effect_v2pe_cpu.yaml`` (a random delta per image from V2PE's set), the same overrides
   for both (data, checkpoint folder, MLflow store, seeds, steps);
3. evaluation: ``v2pe-eval`` (teacher-forced; ``--mode both`` adds generation) of each checkpoint on
   generated evaluation needles at L, 2L, 4L, 8L, 16L context tokens (``--lengths-factor``), where L
   is the longest training context, for the deltas 1, 1/4, 1/16, 1/64 and auto;
4. ``OUT/results.json``: per model, per length, per delta, the accuracy and the mean log-probability
   of the answer (and per task), with the settings and the wall time of each phase; ``OUT/effect.png``:
   the two models' accuracy maps (length x delta) side by side. Each model's own evaluation folder
   (``OUT/<model>/eval``) keeps v2pe-eval's heat maps, tables and records.

Training and scoring are the project's commands, run as subprocesses
(``python -m v2pe_megatron.cli.train`` / ``.eval``); this script only generates the data, passes the
settings and collects what they write. Exit codes: 0 done, 1 a step failed, 2 bad flags.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"baseline": ROOT / "recipes" / "effect_baseline_cpu.yaml", "v2pe": ROOT / "recipes" / "effect_v2pe_cpu.yaml"}
DELTAS = ["1", "1/4", "1/16", "1/64", "auto"]
FACTORS = [1, 2, 4, 8, 16]
# Training contexts: these fractions of the longest context that fits data.seq_length with the prompt.
TRAIN_FRACTIONS = (0.4, 0.55, 0.7, 0.85, 1.0)


def _parser() -> argparse.ArgumentParser:
    from v2pe_megatron.data.needles import TASKS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, required=True, help="seed of the data, the weights and the delta draws")
    p.add_argument("--out", required=True, help="a new (or empty) folder for everything the experiment writes")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipes' train.steps)")
    p.add_argument("--lengths-factor", nargs="+", type=int, default=FACTORS,
                   help="evaluation context lengths as multiples of L, the longest training context")
    p.add_argument("--deltas", nargs="+", default=DELTAS, help="inference deltas (v2pe-eval --delta)")
    p.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=["retrieval-text", "retrieval-image"])
    p.add_argument("--image-fraction", type=float, default=0.75,
                   help="share of each context (training and evaluation) that is images")
    p.add_argument("--train-samples", type=int, default=4000, help="training samples to generate (at least)")
    p.add_argument("--samples-per-cell", type=int, default=2, help="evaluation samples per task, length and depth")
    p.add_argument("--mode", choices=("teacher-forced", "both"), default="teacher-forced",
                   help="v2pe-eval --mode (both: greedy generation too, one forward per new token)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="recipe overrides for BOTH models (they stay equal outside v2pe), e.g. data.seq_length=2048")
    return p


def _usage_problem(args: argparse.Namespace) -> str | None:
    from v2pe_megatron.cli.eval import parse_delta

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return f"--out {out}: exists and is not an empty folder; give a new folder (nothing is overwritten)"
    if args.steps is not None and args.steps < 1:
        return f"--steps {args.steps} must be >= 1"
    if any(f < 1 for f in args.lengths_factor):
        return f"--lengths-factor {args.lengths_factor}: every factor must be >= 1"
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        return f"--depths {args.depths}: every depth must lie in [0, 1]"
    if not 0.0 <= args.image_fraction < 1.0:
        return f"--image-fraction {args.image_fraction} must lie in [0, 1)"
    if args.train_samples < 1 or args.samples_per_cell < 1:
        return "--train-samples and --samples-per-cell must be >= 1"
    bad = [o for o in args.overrides if "=" not in o or o.split("=", 1)[0].startswith(("v2pe.", "name"))]
    if bad:
        return f"--set {bad}: give KEY=VALUE recipe overrides outside v2pe and name (the two models differ only there)"
    for d in args.deltas:
        try:
            parse_delta(d)
        except (ValueError, argparse.ArgumentTypeError) as e:
            return f"--deltas {d}: {e}"
    return None


def _say(msg: str, start: float) -> None:
    print(f"[v2pe_effect {time.perf_counter() - start:7.1f} s] {msg}", flush=True)


def _run(cmd: list[str], what: str, start: float) -> float:
    """A project command as a subprocess, its output on this console; the seconds it took."""
    _say(f"{what}: {' '.join(cmd)}", start)
    t = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    rc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env).returncode
    if rc != 0:
        raise SystemExit(f"v2pe_effect: {what} failed (exit code {rc}); its output is above")
    return time.perf_counter() - t


def make_training_data(recipe, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The training split's needles at lengths up to the longest context that fits data.seq_length
    with its question and answer, written in InternVL's format; every sample checked to fit."""
    from v2pe_megatron.data.needles import synth_needles, training_records
    from v2pe_megatron.data.synthetic import sample_lengths, write_synthetic
    from v2pe_megatron.data.tokenizer import build_tokenizer
    from v2pe_megatron.parallel.layout import Layout

    tok = build_tokenizer(recipe.data.tokenizer_path)
    count = lambda t: len(tok.encode(t))  # noqa: E731
    seq = recipe.data.seq_length
    it = recipe.model.num_image_token

    def generate(top: int, per_cell: int):
        lengths = sorted({max(1, int(top * f)) for f in TRAIN_FRACTIONS})
        depths = [round(k / 10, 2) for k in range(11)]
        samples, images = synth_needles(lengths, depths, tasks=args.tasks, samples_per_cell=per_cell, seed=args.seed,
                                        count_tokens=count, image_tokens=it, image_fraction=args.image_fraction,
                                        split="train")
        return lengths, depths, samples, images

    # The longest context: data.seq_length less the prompt + answer overhead, measured on the set
    # itself with the loader's own tokenization and tiling; shrunk until every sample fits.
    cells = len(args.tasks) * len(TRAIN_FRACTIONS) * 11
    per_cell = max(1, math.ceil(args.train_samples / cells))
    top, limit = seq, seq - (Layout.from_config(recipe.parallel).seq_multiple - 1)
    for _ in range(10):
        lengths, depths, samples, images = generate(top, per_cell)
        recs = training_records(samples)
        sizes = sample_lengths(recs, images, recipe, tok)
        over = max(n for n, _ in sizes) - limit
        if over <= 0:
            break
        top -= over + 4
    too_long = sum(n > limit or t > recipe.data.max_tiles_per_pack for n, t in sizes)
    if too_long:
        raise SystemExit(f"v2pe_effect: {too_long} of {len(recs)} training samples exceed data.seq_length={seq} "
                         f"or data.max_tiles_per_pack={recipe.data.max_tiles_per_pack}; lower --image-fraction "
                         f"or raise them")
    meta = write_synthetic(out, len(recs), records=(recs, images))
    return {"meta": str(meta), "samples": len(recs), "context_lengths": lengths, "depths": depths,
            "longest_context": max(lengths), "longest_sample_tokens": max(n for n, _ in sizes),
            "samples_per_cell": per_cell, "split": "train"}


def collect(results_json: Path) -> dict[str, Any]:
    """Per length, per delta (and per task): accuracy and mean log-prob of v2pe-eval's teacher-forced
    records (and the generation verdicts where they exist)."""
    written = json.loads(results_json.read_text())
    recs = written["records"]
    # lengths ascending, deltas in the order asked (v2pe-eval sorts its records by id and delta label)
    out: dict[str, Any] = {str(n): {d: {"records": []} for d in written["deltas"]} for n in sorted(written["lengths"])}
    for r in recs:
        out[str(r["length"])][r["delta"]]["records"].append(r)
    out = {n: {d: c for d, c in by.items() if c["records"]} for n, by in out.items()}
    for by_delta in out.values():
        for cell in by_delta.values():
            rs = cell.pop("records")
            cell.update(_means(rs))
            cell["delta_values"] = sorted({r["delta_value"] for r in rs}, reverse=True)
            cell["beyond_trained_positions"] = sum(not r["fits"] for r in rs)
            cell["per_task"] = {t: _means([r for r in rs if r["task"] == t]) for t in sorted({r["task"] for r in rs})}
    return out


def _means(rs: list[dict[str, Any]]) -> dict[str, Any]:
    m = {"samples": len(rs),
         "accuracy": sum(r["tf_acc"] for r in rs) / len(rs),
         "mean_logprob": sum(r["tf_logp"] for r in rs) / len(rs)}
    gen = [r["generate"] for r in rs if r.get("generate") is not None]
    if gen:
        m["generate"] = sum(gen) / len(gen)
    return m


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(results["models"])
    lengths = results["eval_lengths"]
    deltas = results["deltas"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models) + 1, 0.55 * len(lengths) + 2.2),
                             squeeze=False, sharey=True, layout="constrained")
    for ax, name in zip(axes[0], models):
        grid = results["models"][name]["eval"]
        cells = [[grid.get(str(n), {}).get(d, {}) for d in deltas] for n in lengths]
        vals = np.array([[c.get("accuracy", np.nan) for c in row] for row in cells])
        im = ax.imshow(vals, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(cells):
            for j, c in enumerate(row):
                if c:
                    ax.text(j, i, f"{c['accuracy']:.2f}\n{c['mean_logprob']:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(deltas)), deltas)
        ax.set_yticks(range(len(lengths)), [f"{n // results['L']}L ({n})" if n % results["L"] == 0 else str(n)
                                            for n in lengths])
        ax.set_xlabel("inference delta")
        ax.set_title(f"{name} ({results['models'][name]['recipe_name']})")
    axes[0][0].set_ylabel("context tokens")
    fig.colorbar(im, ax=axes[0].tolist(), label="teacher-forced accuracy")
    fig.suptitle(f"V2PE effect, seed {results['seed']}: trained at L={results['L']} context tokens, "
                 f"{results['steps']} steps; cells: accuracy over mean log-prob of the answer", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from v2pe_megatron.runtime.quiet import quiet_library_warnings

    quiet_library_warnings()
    args = _parser().parse_args(argv)
    problem = _usage_problem(args)
    if problem:
        print(f"v2pe_effect: {problem}", file=sys.stderr)
        return 2
    from v2pe_megatron.config import RecipeError, load_recipe

    seeds = [f"train.seed={args.seed}", f"data.seed={args.seed}", f"v2pe.seed={args.seed}"]
    common = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps else [])
    try:
        recipes = {k: load_recipe(p, common + seeds) for k, p in RECIPES.items()}
    except RecipeError as e:
        print(f"v2pe_effect: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = recipes["baseline"]
    timings: dict[str, float] = {}

    _say(f"[1/3] training data (split train, seed {args.seed}) -> {out / 'data'}", start)
    t = time.perf_counter()
    data = make_training_data(base, out / "data", args)
    timings["data"] = time.perf_counter() - t
    L = data["longest_context"]
    lengths = [f * L for f in args.lengths_factor]
    _say(f"      {data['samples']} samples, contexts {data['context_lengths']} tokens (L = {L}; the longest sample "
         f"{data['longest_sample_tokens']} of data.seq_length={base.data.seq_length})", start)

    tracking = f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}"
    models: dict[str, Any] = {}
    for k, (name, path) in enumerate(RECIPES.items()):
        ckpt = out / name / "ckpt"
        cmd = ["-m", "v2pe_megatron.cli.train", str(path), *common, *seeds, f"data.meta_path={data['meta']}",
               f"checkpoint.dir={ckpt}", tracking]
        timings[f"train_{name}"] = _run(cmd, f"[2/3] training {name} ({k + 1}/2)", start)
        models[name] = {"recipe": str(path.relative_to(ROOT)), "recipe_name": recipes[name].name,
                        "v2pe_policy": recipes[name].v2pe.policy, "ckpt": str(ckpt)}
    for k, name in enumerate(RECIPES):
        ev = out / name / "eval"
        cmd = ["-m", "v2pe_megatron.cli.eval", str(RECIPES[name]), *common, *seeds, tracking,
               "--ckpt", models[name]["ckpt"], "--synth", "--seed", str(args.seed), "--tasks", *args.tasks,
               "--lengths", *map(str, lengths), "--depths", *map(str, args.depths),
               "--image-fraction", str(args.image_fraction), "--samples-per-cell", str(args.samples_per_cell),
               "--delta", *args.deltas, "--mode", args.mode, "--out", str(ev)]
        timings[f"eval_{name}"] = _run(cmd, f"[3/3] evaluating {name} ({k + 1}/2)", start)
        models[name]["eval"] = collect(ev / "results.json")
        models[name]["eval_dir"] = str(ev)

    timings["total"] = time.perf_counter() - start
    results = {"seed": args.seed, "L": L, "trained_seq_length": base.data.seq_length,
               "steps": base.train.steps, "eval_lengths": lengths, "lengths_factor": list(args.lengths_factor),
               "deltas": list(args.deltas), "depths": list(args.depths), "tasks": list(args.tasks),
               "image_fraction": args.image_fraction, "samples_per_cell": args.samples_per_cell, "mode": args.mode,
               "overrides": list(args.overrides), "training_data": data, "models": models,
               "wall_seconds": {k: round(v, 1) for k, v in timings.items()},
               "command": " ".join([Path(sys.argv[0]).name if argv is None else "v2pe_effect.py",
                                    *(sys.argv[1:] if argv is None else argv)]),
               "load_average": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "effect.png")
    _say(f"done in {timings['total']:.0f} s: {out / 'results.json'}, {out / 'effect.png'}", start)
    print(table(results))
    return 0


def table(results: dict[str, Any]) -> str:
    """Accuracy (mean log-prob) per length and delta, one block per model."""
    lines = []
    for name, m in results["models"].items():
        lines.append(f"{name} ({m['v2pe_policy']}): teacher-forced accuracy (mean log-prob)")
        lines.append(f"{'length':>10} " + " ".join(f"{d:>15}" for d in results["deltas"]))
        for n in results["eval_lengths"]:
            cells = [m["eval"].get(str(n), {}).get(d) for d in results["deltas"]]
            lines.append(f"{n:>10} " + " ".join(f"{c['accuracy']:6.2f} ({c['mean_logprob']:6.2f})" if c else f"{'-':>15}"
                                                 for c in cells))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
