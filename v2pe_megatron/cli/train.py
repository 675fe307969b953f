"""``v2pe-train RECIPE [key=value ...]``: pretrain from a recipe.

Under torchrun or srun it runs as the rank it was given. Started by hand with
``launcher.nproc_per_node > 1`` it starts those ranks itself on this machine (see
``runtime.launch``), so ``v2pe-train recipes/tiny_cpu.yaml`` is a complete 2-rank run.

Before it starts a rank it checks what the recipe alone cannot show (``v2pe_megatron.preflight``):
that ``checkpoint.dir`` can be written, that the tokenizer's special-token ids are the model's, that
the machine has what ``launcher.backend`` and ``model.spec`` ask for; and a run whose checkpoint is
already at ``train.steps`` says so and exits 0. ``--list`` shows the shipped recipes and the model
presets.

``--print-sbatch [--nodes N --gpus-per-node G --time TIME]`` prints the ``sbatch`` command line
for ``slurm/train.sbatch`` that fits the recipe's layout (or says why none does); ``--run-name NAME``
gives the run its folder ``runs/NAME/`` (``runtime.sbatch``), which is how a requeued Slurm job
finds its own checkpoint and MLflow run.

Exit codes (``runtime.exit_codes``): 0 done, 1 error, 2 bad recipe or command line, 75 stopped by
SIGTERM/SIGUSR1/SIGINT after saving a checkpoint of new steps (run the same command to resume),
128+N (143 SIGTERM, 138 SIGUSR1, 130 SIGINT) stopped by signal N with nothing new saved (no
checkpoint.dir, or the signal came before the first step), 65 stopped after
``train.max_nonfinite_steps`` non-finite steps in a row.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from v2pe_megatron.config import RecipeError, expected_world_size, load_recipe, to_yaml
from v2pe_megatron.cli.common import launch_rank, under_launcher
from v2pe_megatron.runtime import exit_codes


USAGE = """v2pe-train RECIPE [key=value ...] [--nproc N] [--run-name NAME] [--print-recipe]
       v2pe-train RECIPE [key=value ...] --print-sbatch [--nodes N] [--gpus-per-node G] [--time TIME]
       v2pe-train --list"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="v2pe-train", description=__doc__, usage=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Optional for argparse, so that --list needs no recipe; main() asks for it otherwise.
    p.add_argument("recipe", nargs="?", metavar="RECIPE", help="YAML recipe, e.g. recipes/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides (optional), e.g. train.steps=10 parallel.tp=2")
    p.add_argument("--list", action="store_true", help="list the shipped recipes and the model presets, and exit")
    p.add_argument("--nproc", type=int, default=None, help="ranks to start here (default: launcher.nproc_per_node)")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--run-name", default=None, metavar="NAME",
                   help="name the run NAME: its MLflow store and metrics go to runs/NAME/ and, unless the recipe "
                        "sets checkpoint.dir, its checkpoints to runs/NAME/checkpoints, so the same command "
                        "resumes it (slurm/train.sbatch passes the job name)")
    g = p.add_argument_group("Slurm", "--print-sbatch prints the sbatch command line that fits the recipe's layout")
    g.add_argument("--print-sbatch", action="store_true", help="print the sbatch command for slurm/train.sbatch and exit")
    g.add_argument("--nodes", type=int, default=None, help="nodes (default: launcher.nnodes)")
    g.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node, one rank each (default: none, launcher.nproc_per_node CPU ranks per node)")
    g.add_argument("--time", default=None, metavar="TIME",
                   help="the job's time limit in any form sbatch takes: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, "
                        "D-HH:MM:SS (default 04:00:00)")
    return p


# A stop signal that arrives while a rank is still starting (importing torch and megatron takes
# seconds; a requeued Slurm job can be preempted or hit its signal then) must not leave a traceback.
# Nothing has been trained since the last checkpoint at that point, so the process leaves at once
# with ``exit_codes.stopped(N)``: not RESUME, because a rerun would start exactly where this one did
# and a job that is signalled at every start (a time limit shorter than the --signal lead) must not
# be requeued forever. Armed only in a process of its own (never in a caller's, e.g. a test's), and
# disarmed before training or the launcher's forwarding start: from then on they handle stop signals
# themselves.
_EARLY_STOP = {"armed": False}


def _stop_before_start(signum, frame) -> None:
    if _EARLY_STOP["armed"]:
        code = exit_codes.stopped(signum)
        os.write(2, f"v2pe-train: pid {os.getpid()} got {signal.Signals(signum).name} before training started: "
                    f"nothing trained, nothing new to save; exit code {code} (not {exit_codes.RESUME}: running "
                    f"again starts where this run started){_slurm_hint(signum)}\n".encode())
        os._exit(code)


def _slurm_hint(signum: int) -> str:
    if signum != signal.SIGUSR1 or "SLURM_JOB_ID" not in os.environ:
        return ""
    return ("\nv2pe-train: under Slurm USR1 is the time-limit signal (sbatch --signal=USR1@N): if it came at "
            "start, the job's --time is not longer than N; 'v2pe-train RECIPE --print-sbatch --time ...' "
            "writes a --time and a --signal that fit")


def _arm_early_stop(armed: bool) -> None:
    from v2pe_megatron.runtime.signals import STOP_SIGNALS

    _EARLY_STOP["armed"] = armed
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop_before_start)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        _arm_early_stop(True)
    parser = _parser()
    args = parser.parse_intermixed_args(argv)  # overrides may follow flags (--nproc 4 parallel.tp=2)
    if args.list:
        print(listing())
        return 0
    if args.recipe is None:
        parser.error("give a recipe file (v2pe-train --list shows the shipped recipes)")
    from v2pe_megatron.runtime.quiet import quiet_library_warnings

    quiet_library_warnings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("megatron", "mlflow", "alembic", "urllib3", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    overrides = list(args.overrides)
    if args.nproc is not None:
        overrides.append(f"launcher.nproc_per_node={args.nproc}")
    if not args.print_sbatch and (args.nodes is not None or args.gpus_per_node is not None or args.time):
        print("v2pe-train: --nodes, --gpus-per-node and --time go with --print-sbatch", file=sys.stderr)
        return exit_codes.USAGE
    try:
        recipe = load_recipe(args.recipe, overrides)
        if args.print_sbatch:
            from v2pe_megatron.runtime.sbatch import DEFAULT_TIME, sbatch_command

            cmd = sbatch_command(recipe, args.recipe, args.overrides, nodes=args.nodes,
                                 gpus_per_node=args.gpus_per_node, time=args.time or DEFAULT_TIME)
            for w in cmd.warnings:
                print(f"v2pe-train: warning: {w}", file=sys.stderr)
            print(f"# {cmd.describe()}\n{cmd.command_line()}")
            return 0
        if args.run_name is not None:
            from v2pe_megatron.runtime.sbatch import run_folder_overrides

            overrides += run_folder_overrides(recipe, args.run_name)
            recipe = load_recipe(args.recipe, overrides)
        if not under_launcher():  # the layout must fit the ranks we are about to start
            load_recipe(args.recipe, overrides, validate_for_world_size=expected_world_size(recipe))
    except RecipeError as e:
        print(f"v2pe-train: {e}", file=sys.stderr)
        return exit_codes.USAGE
    if args.print_recipe:
        print(to_yaml(recipe))
        return 0
    nproc = recipe.launcher.nproc_per_node
    if not under_launcher() and nproc > 1 and recipe.launcher.nnodes > 1:
        print("v2pe-train: multi-node runs start under srun or torchrun (see slurm/)", file=sys.stderr)
        return exit_codes.USAGE
    code = _preflight(recipe, args.recipe)
    if code is not None:
        return code
    if _loads_a_checkpoint(recipe):
        from v2pe_megatron.cli.checkpoint_check import checks_here, refuse_unusable_checkpoint
        from v2pe_megatron.training.checkpointing import check_recipe_checkpoint

        # the checkpoint the run would load, against the recipe's model: before any rank or model exists
        if checks_here(recipe.launcher.nproc_per_node):
            code = refuse_unusable_checkpoint("v2pe-train", lambda: check_recipe_checkpoint(recipe))
            if code is not None:
                return code
    if not under_launcher() and nproc > 1:
        from v2pe_megatron import preflight
        from v2pe_megatron.runtime.launch import run_local

        cmd = ["-m", "v2pe_megatron.cli.train", args.recipe, *overrides]
        print(f"v2pe-train: starting {nproc} ranks: {' '.join(cmd)}", flush=True)
        _arm_early_stop(False)  # the launcher forwards stop signals to its ranks from here on
        code = run_local(cmd, nproc, env={**os.environ, preflight.CHECKED_ENV: "1"})
        if argv is None:
            _exit_now(code)
        return code
    code = _run(recipe)
    if argv is None:  # a process of its own (not a caller's function call): leave now
        _exit_now(code)
    return code


def _preflight(recipe, recipe_path: str) -> int | None:
    """The checks before anything is built (``v2pe_megatron.preflight``): an exit code to leave with
    (USAGE with one message, or SUCCESS for a finished run), or None to go on. Skipped in the ranks
    this command started itself: it checked before starting them."""
    from v2pe_megatron import preflight

    if os.environ.get(preflight.CHECKED_ENV):
        return None
    first = launch_rank() == 0  # under srun every rank checks, so that every one stops; one speaks
    try:
        done = preflight.check_training(recipe, recipe_path, warn=None if first else (lambda _: None))
    except preflight.PreflightError as e:
        print(f"v2pe-train: {e}", file=sys.stderr)
        return exit_codes.USAGE
    if done is not None:
        if first:
            print(done.message(), flush=True)
        return exit_codes.SUCCESS
    return None


def listing() -> str:
    """``--list``: the recipes under the checkout's ``recipes/`` (file, model preset, ranks, first
    comment line) and the model presets (parameters and shapes)."""
    from pathlib import Path

    from v2pe_megatron.config import PRESETS
    from v2pe_megatron.plan import parameter_count

    root = Path(__file__).resolve().parents[2] / "recipes"
    lines = []
    files = sorted(root.glob("*.yaml")) if root.is_dir() else []
    if files:
        lines.append(f"Recipes ({_shown(root)}/):")
        rows = []
        for f in files:
            about = next((ln.lstrip("#").strip() for ln in f.read_text().splitlines() if ln.startswith("#")), "")
            try:
                r = load_recipe(f)
                what = (f"{r.model.preset or '(defaults)'}, {expected_world_size(r)} rank(s), "
                        f"{r.data.seq_length} tokens")
            except RecipeError as e:  # e.g. a placeholder variable naming a missing file
                what = f"does not load here: {str(e).splitlines()[-1].strip(' -')}"
            rows.append((f.name, what, about))
        w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
        lines += [f"  {a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
    else:
        lines.append(f"Recipes: none at {root} (they ship in the project's checkout, recipes/)")
    lines.append("Model presets (model.preset):")
    for name in PRESETS:
        m = load_recipe(None, [f"model.preset={name}"]).model
        lm, v = m.language, m.vision
        lines.append(f"  {name:<13} {_count(parameter_count(m)):>6} parameters: vision {v.num_layers} layers x "
                     f"{v.hidden_size} ({v.image_size} px), LLM {lm.arch} {lm.num_layers} layers x {lm.hidden_size}, "
                     f"vocab {lm.vocab_size}")
    lines.append("Use: v2pe-train <recipe> [key=value ...]; v2pe-train <recipe> --print-recipe shows every key.")
    return "\n".join(lines)


def _shown(path) -> str:
    try:
        return str(path.relative_to(os.getcwd()))
    except ValueError:
        return str(path)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _loads_a_checkpoint(recipe) -> bool:
    """The run would load weights (a resume or ``checkpoint.pretrained``): only then is torch imported
    before launch, to compare that checkpoint's tensors with the recipe's model."""
    from v2pe_megatron.training.checkpoint_files import saved_iterations

    c = recipe.checkpoint
    return bool(c.pretrained) or bool(c.dir and c.load and os.path.isdir(c.dir) and saved_iterations(c.dir))


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown. Everything that matters is closed by now (checkpoint
    fsynced, MLflow run ended, process group destroyed); what is left is the garbage collection of
    torch, megatron and MLflow's module state, ~6-10 s per rank on a small machine, which a job's
    signal-to-exit time (a scheduler's grace period) should not pay."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(recipe) -> int:
    """One rank's run; returns its ``runtime.exit_codes`` code."""
    from v2pe_megatron.data.skips import SkipCounter
    from v2pe_megatron.training.checkpointing import CheckpointError
    from v2pe_megatron.training.loop import train
    from v2pe_megatron.training.metrics import MFUError

    # train() records stop signals while it runs (installing its handlers is its first act); once it
    # returns, the checkpoint is saved and a late signal (e.g. a second SIGTERM) must not turn the
    # exit code into 128+N. The disarmed handler ignores them: a Python handler, not SIG_IGN, since an
    # ignored signal would stay ignored in any program a rank starts.
    _arm_early_stop(False)
    try:
        s = train(recipe)
    except CheckpointError as e:  # names the folder and the fix: no stack trace
        if not e.collective or launch_rank() == 0:  # every rank has a collective one: said once
            print(f"v2pe-train: {e}", file=sys.stderr)
        return exit_codes.ERROR
    except MFUError as e:  # raised by every rank at the same step (training.metrics): said once
        if launch_rank() == 0:
            print(f"v2pe-train: {e}", file=sys.stderr)
        return exit_codes.ERROR
    if launch_rank() == 0:
        print(f"\nv2pe-train: {recipe.name}: ran steps {s.final_step - s.steps_run + 1}..{s.final_step} on "
              f"{s.world_size} rank(s) ({s.layout}), {s.parameters / 1e6:.2f}M parameters per rank, "
              f"{s.seconds:.0f}s")
        if s.losses:
            print(f"v2pe-train: loss {s.losses[0]:.4f} -> {s.losses[-1]:.4f}")
        counted = SkipCounter(s.skips)
        if counted.report_lines():
            if counted.total:  # the counters run over the whole run: a bad sample counts once per epoch
                print(f"v2pe-train: skips over data epochs 0..{s.data_epoch} (a bad sample is counted again "
                      f"in every epoch that reads it; v2pe-data inspect --skips-file lists them):")
            for line in counted.report_lines():
                print(line)
        if s.tracking_uri:
            print(f"v2pe-train: MLflow run {s.run_id} in {s.tracking_uri} "
                  f"(view: mlflow ui --backend-store-uri {s.tracking_uri})")
        if s.nonfinite_steps:
            print(f"v2pe-train: {s.nonfinite_steps} step(s) skipped for a non-finite loss or grad norm")
        if s.exit_code == exit_codes.RESUME:
            print(f"v2pe-train: exit code {s.exit_code}: stopped by a signal; run the same command to resume")
        elif exit_codes.stopped_by(s.exit_code):
            signum = exit_codes.stopped_by(s.exit_code)
            if s.steps_run:
                why = (f"checkpoint.dir is not set, so the {s.steps_run} step(s) trained are not saved; running "
                       "again starts over at step 1 (set checkpoint.dir=... to make a stop resumable)")
            else:
                why = ("it came before the first step, so nothing new was saved; running again starts where "
                       f"this run started{_slurm_hint(signum)}")
            print(f"v2pe-train: exit code {s.exit_code}: stopped by {signal.Signals(signum).name}; {why}")
        elif s.exit_code == exit_codes.NONFINITE:
            print(f"v2pe-train: exit code {s.exit_code}: too many non-finite steps in a row "
                  "(train.max_nonfinite_steps)")
    return s.exit_code


if __name__ == "__main__":
    sys.exit(main())
