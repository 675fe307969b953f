"""Slurm jobs of a recipe: the ``sbatch`` command line that fits its layout, and the run folder a job
keeps across requeues.

``slurm/train.sbatch`` is the job script; ``v2pe-train RECIPE --print-sbatch`` writes the options
that depend on the recipe (nodes, tasks and GPUs per node, time limit, signal lead) so that nobody
hand-edits a header, and refuses an allocation the layout cannot use, with the fix. The layout rules
themselves (world size = TP x PP x CP x DP, batch divisibility, ...) are ``config.validate``'s and
``parallel.layout``'s; this module adds only what an allocation adds: ranks per node, and tensor
parallel groups that stay inside a node.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from v2pe_megatron.config import Recipe, RecipeError, validate
from v2pe_megatron.parallel.layout import Layout

# The job script's own file name: Slurm names a job after it when sbatch gets no --job-name.
TRAIN_SCRIPT = "train.sbatch"
DEFAULT_TIME = "04:00:00"
# Seconds before the time limit at which Slurm sends USR1 to every rank (``--signal=USR1@N``). The
# ranks finish their step, save and exit 75; the lead must cover one step, the save, and Slurm's
# timer, which checks limits about every 30 s (measured: @50 arrived 52 s before a 1-minute limit).
MAX_SIGNAL_LEAD_S = 300
MIN_SIGNAL_LEAD_S = 60

# Slurm's --time forms: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (sbatch(1)); squeue's
# %l prints the same forms.
_TIME = re.compile(r"(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)")
_UNLIMITED = ("infinite", "unlimited", "-1")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
# Start-up (imports, building the model, loading a checkpoint) counts in each start's time, and a
# start whose first step comes after the signal saves nothing new; below this much time between the
# start and the signal, --print-sbatch warns.
MIN_TRAIN_WINDOW_S = 600


def slurm_seconds(text: str) -> Optional[int]:
    """A time in any form Slurm's ``--time`` takes -> seconds, rounded up to whole minutes as Slurm
    does; None for no limit (``infinite``, ``UNLIMITED``, ``0``). Raises ValueError for anything else."""
    t = text.strip()
    if t.lower() in _UNLIMITED:
        return None
    m = _TIME.fullmatch(t)
    if not m:
        raise ValueError(t)
    g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
    if "d" in g:  # D-HH[:MM[:SS]]
        seconds = ((g["d"] * 24 + g["dh"]) * 60 + g.get("dm", 0)) * 60 + g.get("ds", 0)
    elif "c" in g:  # HH:MM:SS
        seconds = (g["a"] * 60 + g["b"]) * 60 + g["c"]
    elif "b" in g:  # MM:SS
        seconds = g["a"] * 60 + g["b"]
    else:  # minutes
        seconds = g["a"] * 60
    return -(-seconds // 60) * 60 or None  # Slurm's resolution is a minute; 0 is no limit


def parse_time(text: str) -> int:
    """A job's time limit for ``--print-sbatch``, in any form sbatch's ``--time`` takes -> seconds."""
    try:
        seconds = slurm_seconds(text)
    except ValueError:
        raise RecipeError(f"--time {text!r}: give the job's time limit as sbatch takes it: minutes, MM:SS, "
                          "HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, e.g. 24:00:00 or 1-12") from None
    if seconds is None:
        raise RecipeError(f"--time {text}: give a time limit: the job saves and requeues itself when Slurm's "
                          "signal announces the limit, and without one it never comes")
    if seconds < 2 * MIN_SIGNAL_LEAD_S:
        raise RecipeError(f"--time {text}: at least {2 * MIN_SIGNAL_LEAD_S // 60} minutes, so that the job trains "
                          f"before Slurm's stop signal ({MIN_SIGNAL_LEAD_S} s before the limit) arrives")
    return seconds


def signal_lead_from(spec: str) -> Optional[int]:
    """Seconds before the limit of an sbatch ``--signal`` value (``[R:|B:]SIG[@N]``; Slurm's default
    N is 60); None when it is not one."""
    m = re.fullmatch(r"(?:[A-Za-z]+:)?[A-Za-z0-9]+(?:@(\d+))?", spec.strip())
    return None if not m else int(m.group(1) or 60)


def time_limit_warning(limit: str, signal_spec: str) -> Optional[str]:
    """``slurm/job.sh``'s check at job start: the job's limit as squeue prints it and the signal
    lead it was given -> a warning when the signal would come at start (None when fine or unknown)."""
    try:
        seconds = slurm_seconds(limit)
    except ValueError:
        return None
    lead = signal_lead_from(signal_spec)
    if seconds is None or lead is None or seconds > lead:
        return None
    return (f"warning: this job's time limit ({limit}) is not longer than the lead of its stop signal "
            f"(--signal={signal_spec.strip()}), so Slurm signals it as soon as it starts: it saves nothing new "
            "and is not requeued. Give a --time longer than the lead plus start-up, or a shorter lead "
            "(v2pe-train RECIPE --print-sbatch --time ... writes both)")


def signal_lead_s(limit_s: int) -> int:
    """How long before the limit the ranks are told to save: ``MAX_SIGNAL_LEAD_S``, at most a quarter
    of the limit, never below ``MIN_SIGNAL_LEAD_S`` (Slurm's timer granularity)."""
    return max(MIN_SIGNAL_LEAD_S, min(MAX_SIGNAL_LEAD_S, limit_s // 4))


def run_name(name: str) -> str:
    """A job name as a folder name: runs of other characters become ``_``."""
    clean = _NAME_CHARS.sub("_", name).strip("_")
    if not clean or set(clean) == {"."}:
        raise RecipeError(f"--run-name {name!r} leaves no usable folder name; use letters, digits, '.', '_' or '-'")
    return clean


def run_folder_overrides(recipe: Recipe, name: str) -> list[str]:
    """Overrides that give a run a home keyed by ``name`` (a Slurm job name), so that a requeued job
    finds its own checkpoint and continues its own MLflow run: the recipe is named ``name`` (its
    embedded MLflow store and metrics.jsonl go to ``runs/<name>/``, ``training.tracking``) and, unless
    the recipe or an override sets ``checkpoint.dir``, checkpoints go to ``runs/<name>/checkpoints``."""
    from v2pe_megatron.training.tracking import default_run_dir

    name = run_name(name)
    out = [f'name="{name}"']  # quoted: a job called 007 or true stays a string
    if not recipe.checkpoint.dir:
        named = dataclasses.replace(recipe, name=name)
        out.append(f"checkpoint.dir={default_run_dir(named) / 'checkpoints'}")
    return out


@dataclass(frozen=True)
class SbatchCommand:
    """An sbatch command line for one recipe on one allocation."""

    argv: tuple[str, ...]
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    time: str
    signal_lead_s: int
    layout: Layout
    warnings: tuple[str, ...] = ()

    @property
    def ranks(self) -> int:
        return self.nodes * self.tasks_per_node

    def command_line(self) -> str:
        return shlex.join(self.argv)

    def describe(self) -> str:
        per = f"{self.gpus_per_node} GPUs" if self.gpus_per_node else f"{self.tasks_per_node} CPU ranks"
        return (f"{self.layout.describe()} on {self.nodes} node(s) x {per} = {self.ranks} ranks; USR1 "
                f"{self.signal_lead_s} s before the {self.time} limit, then save, requeue, resume")


def train_script(cwd: Optional[Path] = None) -> str:
    """Path of this checkout's ``slurm/train.sbatch`` as the user would type it from ``cwd``."""
    script = Path(__file__).resolve().parents[2] / "slurm" / TRAIN_SCRIPT
    cwd = (cwd or Path.cwd()).resolve()
    try:
        return str(script.relative_to(cwd))
    except ValueError:
        return str(script)


def _allocation_problems(layout: Layout, nodes: int, tasks_per_node: int) -> list[str]:
    """What an allocation adds to the layout rules: a tensor-parallel group communicates in every
    layer, so it must not straddle nodes (megatron puts TP ranks next to each other)."""
    if nodes > 1 and tasks_per_node % layout.tp:
        return [f"parallel.tp={layout.tp} does not divide the {tasks_per_node} ranks per node, so tensor-parallel "
                f"groups would span nodes; use tp in {[d for d in range(1, tasks_per_node + 1) if tasks_per_node % d == 0]}"]
    return []


def _fitting_nodes(recipe: Recipe, nodes: int, tasks_per_node: int, spec: str) -> list[int]:
    fits = []
    for n in range(1, max(8, 2 * nodes) + 1):
        try:
            lay = validate(recipe, world_size=n * tasks_per_node, spec=spec)
        except RecipeError:
            continue
        if not _allocation_problems(lay, n, tasks_per_node):
            fits.append(n)
    return fits


def sbatch_command(recipe: Recipe, recipe_path: str, overrides: Sequence[str] = (), *, nodes: Optional[int] = None,
                   gpus_per_node: Optional[int] = None, time: str = DEFAULT_TIME,
                   script: Optional[str] = None) -> SbatchCommand:
    """The ``sbatch`` line that runs ``recipe`` with one rank per task: ``gpus_per_node`` tasks per
    node (one per GPU), or without GPUs the recipe's ``launcher.nproc_per_node`` CPU ranks per node.
    Raises RecipeError naming the fix when the layout cannot use the allocation."""
    nodes = recipe.launcher.nnodes if nodes is None else nodes
    gpus = gpus_per_node or 0
    if nodes < 1 or gpus < 0:
        raise RecipeError(f"--nodes {nodes} --gpus-per-node {gpus}: need at least 1 node and 0 or more GPUs per node")
    tasks_per_node = gpus or recipe.launcher.nproc_per_node
    limit_s = parse_time(time)
    spec = recipe.model.spec
    world = nodes * tasks_per_node
    where = f"{nodes} node(s) x {tasks_per_node} {'GPUs' if gpus else 'ranks'} = {world} ranks"
    try:
        layout = validate(recipe, world_size=world, spec=spec)
        problems = _allocation_problems(layout, nodes, tasks_per_node)
    except RecipeError as e:
        problems = [str(e).removeprefix("invalid recipe:").strip()]
    if problems:
        fits = _fitting_nodes(recipe, nodes, tasks_per_node, spec)
        hint = (f"\n  with {tasks_per_node} per node it fits --nodes {', '.join(map(str, fits))}" if fits else
                "\n  no node count up to 8 fits: change the layout (parallel.tp/pp/cp, data.global_batch_size)")
        raise RecipeError(f"{recipe.name} does not fit {where}:\n  " + "\n  ".join(problems) + hint)
    lead = signal_lead_s(limit_s)
    warnings = []
    if limit_s - lead < MIN_TRAIN_WINDOW_S:
        warnings.append(f"--time={time} leaves each start {limit_s - lead} s before Slurm's USR1 (sent {lead} s "
                        "before the limit) asks it to save, and start-up (imports, building the model, loading "
                        "the checkpoint) counts in it: a start that has not finished a step by then saves "
                        "nothing new and the job is not requeued. Prefer a --time of "
                        f"{(MIN_TRAIN_WINDOW_S + lead) // 60 + 1} minutes or more")
    argv = ["sbatch", f"--job-name={run_name(recipe.name)}", f"--nodes={nodes}",
            f"--ntasks-per-node={tasks_per_node}"]
    if gpus:
        argv.append(f"--gpus-per-node={gpus}")
    argv += [f"--time={time}", f"--signal=USR1@{lead}", script or train_script(), recipe_path, *overrides]
    return SbatchCommand(tuple(argv), nodes, tasks_per_node, gpus, time, lead, layout, tuple(warnings))

