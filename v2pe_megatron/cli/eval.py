"""``v2pe-eval RECIPE [--ckpt DIR] [--data FILE.jsonl | SPLIT_FOLDER | --synth] --delta 1 1/16 auto [key=value ...]``:
needle-in-a-haystack evaluation in the MM-NIAH style (docs/eval.md).

The model comes from the recipe's ``model`` section, its weights from a torch_dist checkpoint
(``--ckpt``: an ``iter_*`` folder, a training checkpoint folder or a weights folder; random weights
without it, for tests). Long contexts are spread over the recipe's ``parallel.tp`` x ``parallel.cp``
ranks; more ranks split the samples. Started by hand it starts ``--nproc`` ranks itself (default
tp x cp); under torchrun or srun (``python -m v2pe_megatron.cli.eval``) it runs as the rank it was
given. Prints MM-NIAH's and V2PE's figures and our token grid, writes ``OUT/heatmap.png``,
``OUT/heatmap_mmniah.png``, ``OUT/results.json`` and MM-NIAH's result files
(``OUT/mmniah_outputs/{model}_{task}-{split}.jsonl``, for its calculate_scores.py) and logs them
to MLflow. Exit codes: 0 done, 1 error, 2 bad recipe or command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from v2pe_megatron.cli.common import delta, launch_rank, under_launcher
from v2pe_megatron.runtime.paths import unwritable_dir
from v2pe_megatron.runtime import exit_codes


def parse_delta(text: str):
    """``1``, ``0.0625``, ``1/16`` -> float in (0, 1]; ``auto`` stays."""
    return "auto" if text == "auto" else delta(text)


def _parser() -> argparse.ArgumentParser:
    from v2pe_megatron.data.needles import PROMPT_STYLES, TASKS

    p = argparse.ArgumentParser(prog="v2pe-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="YAML recipe (its model, parallel, data.tokenizer_path and tracking sections)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.cp=2")
    p.add_argument("--ckpt", help="torch_dist checkpoint to evaluate (default: random weights)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="MM-NIAH jsonl (images_list, context, question, answer, meta), or a split folder "
                                    "as MM-NIAH ships it (mm_niah_<split>/annotations/<task>.jsonl + images/)")
    src.add_argument("--synth", action="store_true", help="generate the samples (default when no --data)")
    p.add_argument("--image-root", help="folder the jsonl's image paths are relative to (default: <split>/images "
                                        "for <split>/annotations/X.jsonl, else the jsonl's folder)")
    p.add_argument("--task", choices=TASKS, help="task of every line of --data (default: meta.task or file name)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=["retrieval-text", "retrieval-image"],
                   help="generated tasks")
    p.add_argument("--samples-per-cell", type=int, default=1, help="generated samples per task, length and depth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-fraction", type=float, default=0.5, help="share of a generated context that is images")
    p.add_argument("--limit", type=int, default=0, help="evaluate at most this many samples (0: all)")
    p.add_argument("--delta", nargs="+", type=parse_delta, default=["auto"],
                   help="inference deltas: 1 1/16 1/64 ... or auto (the rule of docs/eval.md)")
    p.add_argument("--trained-positions", type=int, default=None,
                   help="position range the model was trained on, for --delta auto (default: the data.seq_length "
                        "that --ckpt's model.yaml records, else the recipe's; V2PE's 32K run: 34000)")
    p.add_argument("--lengths", nargs="+", type=int, help="context lengths in tokens (generated; bins for --data)")
    p.add_argument("--depths", nargs="+", type=float, help="needle depths in [0, 1]")
    p.add_argument("--mode", choices=("generate", "teacher-forced", "both"), default="both")
    p.add_argument("--prompt-style", choices=list(PROMPT_STYLES), default="mmniah",
                   help="how the question is asked: mmniah (MM-NIAH's eval_internvl.py: 1 tile per image, 32/16 "
                        "new tokens for counting/other tasks), v2pe (V2PE's eval_mm_niah.py: no newline before "
                        "the question, 5 tiles, 320/16 new tokens), v2pe-1m (V2PE's MM-NIAH-1M script: 12 tiles)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="greedy budget (default: the prompt style's)")
    p.add_argument("--max-tiles-per-image", type=int, default=None, help="(default: the prompt style's)")
    p.add_argument("--out", default=None, help="folder for heatmap.png and results.json (default: runs/<recipe>/eval)")
    p.add_argument("--nproc", type=int, default=None, help="ranks to start here (default: tp x cp)")
    p.add_argument("--choose-delta", action="store_true",
                   help="print the delta the rule picks per context length for these samples and exit (no model)")
    return p


def main(argv: list[str] | None = None) -> int:
    from v2pe_megatron.runtime.quiet import quiet_library_warnings

    quiet_library_warnings()  # first: the parser's imports (data.needles) import megatron
    args = _parser().parse_intermixed_args(argv)
    from v2pe_megatron.config import RecipeError, load_recipe

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("megatron", "mlflow", "alembic", "urllib3", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        recipe = load_recipe(args.recipe, list(args.overrides))
    except RecipeError as e:
        print(f"v2pe-eval: {e}", file=sys.stderr)
        return exit_codes.USAGE
    problem = _usage_problem(args, recipe)
    if problem:
        print(f"v2pe-eval: {problem}", file=sys.stderr)
        return exit_codes.USAGE
    if args.choose_delta:
        return _done(_choose_delta(args, recipe), argv)
    from v2pe_megatron.cli.checkpoint_check import checks_here, refuse_unusable_checkpoint

    par = recipe.parallel
    if args.ckpt and checks_here(args.nproc or par.tp * par.cp * par.pp):  # before any rank or model exists
        from v2pe_megatron.training.checkpointing import check_model_matches

        code = refuse_unusable_checkpoint("v2pe-eval", lambda: check_model_matches(
            args.ckpt, recipe.model, what=f"--ckpt {args.ckpt}"))
        if code is not None:
            return _done(code, argv)
    if not under_launcher():
        par = recipe.parallel
        nproc = args.nproc or par.tp * par.cp * par.pp
        if nproc > 1:
            from v2pe_megatron.runtime.launch import run_local

            cmd = ["-m", "v2pe_megatron.cli.eval", *(argv if argv is not None else sys.argv[1:])]
            print(f"v2pe-eval: starting {nproc} ranks", flush=True)
            return _done(run_local(cmd, nproc), argv)
    return _done(_run(args, recipe), argv)


def _usage_problem(args: argparse.Namespace, recipe) -> str | None:
    """The first bad flag, before any rank starts or model is built: the settings' own checks, and
    an output folder that could not be written at the end of the evaluation."""
    if args.nproc is not None and args.nproc < 1:
        return f"--nproc {args.nproc} must be >= 1 (default: the recipe's parallel.tp x parallel.cp)"
    if args.data and not Path(args.data).exists():
        return f"--data {args.data}: no such file or folder"
    if args.data and Path(args.data).is_dir() and not any((Path(args.data) / "annotations").glob("*.jsonl")):
        return (f"--data {args.data}: a folder needs MM-NIAH's layout, annotations/<task>.jsonl and images/ "
                f"(give the mm_niah_<split> folder or one jsonl file)")
    try:
        settings, _ = _settings_and_source(args, recipe)
    except ValueError as e:
        return str(e)
    if args.choose_delta:  # writes nothing
        return None
    why = unwritable_dir(settings.out_dir)
    if why:
        flag = f"--out {args.out}" if args.out else f"the output folder {settings.out_dir} (--out)"
        return f"{flag}: {why}; give a writable folder with --out"
    return None


def _done(code: int, argv: list[str] | None) -> int:
    """A process of its own exits now: the interpreter's teardown of torch, megatron and MLflow state
    takes seconds per rank and has nothing left to do (as v2pe-train)."""
    if argv is None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _settings_and_source(args: argparse.Namespace, recipe):
    from v2pe_megatron.eval.runner import EvalSettings, Source
    from v2pe_megatron.training.tracking import default_run_dir

    modes = ("generate", "teacher-forced") if args.mode == "both" else (args.mode,)
    trained, trained_from = trained_positions(args.trained_positions, recipe, args.ckpt)
    settings = EvalSettings(
        deltas=list(args.delta), modes=modes, lengths=args.lengths, depths=args.depths,
        trained_positions=trained, trained_positions_from=trained_from,
        delta_set=tuple(recipe.v2pe.delta_set), prompt_style=args.prompt_style, max_new_tokens=args.max_new_tokens,
        max_tiles_per_image=args.max_tiles_per_image,
        out_dir=Path(args.out) if args.out else default_run_dir(recipe) / "eval",
        title=f"{recipe.name}: {Path(args.ckpt).name if args.ckpt else 'random weights'}",
        model_name=f"{recipe.name}-{Path(args.ckpt).resolve().name if args.ckpt else 'random'}",
        split=_result_split(args.data))
    source = Source(data=args.data, image_root=args.image_root, task=args.task, tasks=args.tasks,
                    samples_per_cell=args.samples_per_cell, seed=args.seed,
                    image_fraction=args.image_fraction, limit=args.limit)
    return settings, source


def _result_split(data: str | None) -> str:
    """The split of MM-NIAH's result file names: that of an ``mm_niah_<split>`` --data path when its
    scorer knows it, else ``val`` (generated sets; calculate_scores.py refuses other names)."""
    from v2pe_megatron.data.needles import split_of

    split = split_of(data) if data else None
    return split if split in ("val", "test", "rag-val", "rag-test") else "val"


def trained_positions(flag: int | None, recipe, ckpt: str | None) -> tuple[int, str]:
    """(the trained position range for --delta auto, where it came from): --trained-positions, else
    the data.seq_length that --ckpt's model.yaml records (v2pe-train writes it), else the recipe's."""
    from v2pe_megatron.training.checkpoint_files import recorded_seq_length

    if flag is not None:
        return flag, "--trained-positions"
    found = recorded_seq_length(ckpt) if ckpt else None
    if found is not None:
        return found[0], f"data.seq_length recorded in {found[1]}"
    why = " (--ckpt records none)" if ckpt else ""
    return recipe.data.seq_length, f"data.seq_length of the recipe{why}"


def _choose_delta(args: argparse.Namespace, recipe) -> int:
    from v2pe_megatron.config import RecipeError
    from v2pe_megatron.eval.report import delta_label, length_label
    from v2pe_megatron.eval.runner import plan_deltas

    try:
        settings, source = _settings_and_source(args, recipe)
        plans = plan_deltas(recipe, settings, source)
    except (RecipeError, ValueError, FileNotFoundError) as e:
        print(f"v2pe-eval: {e}", file=sys.stderr)
        return exit_codes.USAGE
    print(f"delta rule: the largest of v2pe.delta_set={[delta_label(d) for d in sorted(settings.delta_set, reverse=True)]} "
          f"whose positions stay below the trained range {settings.trained_positions} "
          f"({settings.trained_positions_from})")
    print(f"{'length':>8} {'samples':>8} {'delta':>7} {'last position':>14}  fits")
    for p in plans:
        print(f"{length_label(p.length):>8} {p.samples:>8} {delta_label(p.delta):>7} {p.last_position:>14.0f}  "
              f"{'yes' if p.fits else 'no'}")
    return exit_codes.SUCCESS


def _run(args: argparse.Namespace, recipe) -> int:
    from v2pe_megatron.config import RecipeError
    from v2pe_megatron.eval.report import AGGREGATIONS, delta_label, format_table
    from v2pe_megatron.eval.runner import checkpoint_label, evaluate
    from v2pe_megatron.training.checkpointing import CheckpointError

    try:
        settings, source = _settings_and_source(args, recipe)
        modes = settings.modes
        report = evaluate(recipe, settings, source, ckpt=args.ckpt)
    except (RecipeError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"v2pe-eval: {e}", file=sys.stderr)
        return exit_codes.USAGE
    except CheckpointError as e:  # every checkpoint in --ckpt damaged (found by the ranks' full check)
        if not e.collective or launch_rank() == 0:
            print(f"v2pe-eval: {e}", file=sys.stderr)
        return exit_codes.ERROR
    if launch_rank() == 0:
        n = len({r["id"] for r in report.records})
        print(f"\nv2pe-eval: {recipe.name}: {n} samples x {len(report.deltas)} delta(s), modes {', '.join(modes)}")
        weights = checkpoint_label(report.checkpoint) if report.checkpoint else "random (no --ckpt)"
        print(f"v2pe-eval: weights: {weights}")
        new = (f"{settings.max_new_tokens}" if settings.max_new_tokens is not None else
               f"{settings.style.new_tokens_counting} counting / {settings.style.new_tokens_other} other")
        print(f"v2pe-eval: prompt style {settings.prompt_style} ({settings.style.reference}): "
              f"{settings.max_tiles_per_image} tile(s) per image at most, {new} new tokens")
        print(f"v2pe-eval: trained positions {settings.trained_positions} ({settings.trained_positions_from})")
        if report.dropped:
            print(f"v2pe-eval: {report.dropped} sample(s) longer than the largest --lengths bin were left out")
        print(format_table(report))
        auto = [r for r in report.records if r["delta"] == "auto"]
        for length in sorted({r["length"] for r in auto}):
            chosen = sorted({r["delta_value"] for r in auto if r["length"] == length}, reverse=True)
            # the smallest per-sample choice is the one delta that serves every sample of this length
            print(f"delta rule (trained positions {settings.trained_positions}): {length}-token contexts -> "
                  f"{', '.join(delta_label(d) for d in chosen)}; one delta for all of them: "
                  f"v2pe-convert export-hf --v2pe-delta {delta_label(chosen[-1])}")
        over = sum(1 for r in report.records if not r["fits"])
        if over:
            print(f"v2pe-eval: {over} record(s) reach positions beyond the trained range ({settings.trained_positions})")
        if report.heatmap:
            print(f"v2pe-eval: heat maps {report.heatmap} ({AGGREGATIONS['grid']}), {report.mmniah_heatmap} "
                  f"({AGGREGATIONS['mmniah']}); results {report.results_json}")
        if report.mmniah_files:
            folder = report.mmniah_files[0].parent
            print(f"v2pe-eval: {len(report.mmniah_files)} MM-NIAH result file(s) in {folder} "
                  f"(MM-NIAH's scorer: python calculate_scores.py --outputs-dir {folder})")
        if report.run_id:
            print(f"v2pe-eval: MLflow run {report.run_id} in {report.tracking_uri}")
    return exit_codes.SUCCESS


if __name__ == "__main__":
    sys.exit(main())
