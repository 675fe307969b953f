"""What ``v2pe-train`` checks about the machine and the files a run needs before it starts a rank or
builds a model: what :func:`config.validate` cannot see from the recipe alone.

:func:`check_training` runs, in order:

1. :func:`finished_run`: the checkpoint ``latest`` names in ``checkpoint.dir`` is at or past
   ``train.steps`` (and matches its manifest by names and sizes): nothing is left to train; the CLI
   says where the checkpoint and the MLflow run are and exits 0 without building anything.
2. :func:`check_runtime`: ``launcher.backend=nccl`` without CUDA, ``model.spec=te`` without CUDA and
   Transformer Engine (the rules are ``runtime.distributed.choose_backend`` and
   ``parallel.layout.resolve_spec``, asked here instead of inside every rank).
3. :func:`check_checkpoint_dir`: ``checkpoint.dir`` can be written (a file in its path, a read-only
   mount, ``/proc/...`` are refused); a warning when its file system has less free space than the
   checkpoints this run keeps at once (:func:`plan.checkpoint_bytes`).
4. :func:`check_tokenizer`: the tokenizer (``tokenizer.json`` or sentencepiece) can be read, its
   ``<img>``, ``</img>``, ``<IMG_CONTEXT>`` ids and size against the model's, and it has the special
   tokens of ``data.template`` (``data.chat.check_tokenizer``); an empty ``data.tokenizer_path`` that
   came from an unset ``${oc.env:VAR}`` placeholder (the 2B recipes') is named by its variable.
5. one warning naming the recipe's other placeholders whose variable is not set.

A failure is a :class:`PreflightError`: one message naming the key and the fix, exit code
``USAGE`` (2). Cheap on purpose: no torch import unless the recipe asks for NCCL or the TE spec, no
process group, no megatron. The CLI runs it in the process that starts the ranks, and in a rank that
torchrun or srun started (every rank decides alone, before any rendezvous, so that all of them
stop); ranks that the CLI started itself skip it (:data:`CHECKED_ENV`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from v2pe_megatron.config import Recipe, env_placeholders
from v2pe_megatron.runtime.paths import unwritable_dir
from v2pe_megatron.training.checkpoint_files import finished_iteration, iteration_dir, saved_iterations

log = logging.getLogger("v2pe_megatron.train")

# Set by v2pe-train in the environment of the ranks it starts: the parent has checked already.
CHECKED_ENV = "V2PE_PREFLIGHT_DONE"

Warn = Callable[[str], None]


class PreflightError(Exception):
    """A run that cannot start on this machine with these files; the message says what to change."""


@dataclass(frozen=True)
class Finished:
    """A run whose checkpoint is already at ``train.steps``."""

    name: str
    iteration: int
    steps: int
    folder: Path
    tracking: str = ""  # where its MLflow run is, when it can be told without MLflow

    def message(self) -> str:
        lines = [f"v2pe-train: {self.name} is complete: its checkpoint {self.folder} is at step {self.iteration} "
                 f"(train.steps={self.steps}); nothing to train. Raise train.steps to train on, or give another "
                 f"checkpoint.dir to start a new run."]
        if self.tracking:
            lines.append(f"v2pe-train: {self.tracking}")
        return "\n".join(lines)


def check_training(recipe: Recipe, recipe_path: str | os.PathLike | None = None, *,
                   warn: Optional[Warn] = None) -> Optional[Finished]:
    """Every check above, in that order; returns :class:`Finished` when nothing is left to train.
    ``warn`` gets the warnings (default: logged; ``lambda _: None`` on all ranks but one)."""
    warn = warn or log.warning
    done = finished_run(recipe)
    if done is not None:
        return done
    check_runtime(recipe)
    check_checkpoint_dir(recipe, warn=warn)
    unset = unset_placeholders(recipe, recipe_path)
    check_tokenizer(recipe, unset)
    others = {k: v for k, v in unset.items() if k != "data.tokenizer_path"}
    if others:
        warn("recipe placeholders not set, so these keys are empty: " +
             ", ".join(f"{k} ({var}{': ' + EMPTY_MEANS[k] if k in EMPTY_MEANS else ''})" for k, var in others.items())
             + "; export the variables (the recipe's header names them) or override the keys for a real run")
    return None


# What an empty key means, for the placeholder warning.
EMPTY_MEANS = {"data.meta_path": "synthetic data", "checkpoint.pretrained": "random initial weights",
               "checkpoint.dir": "no checkpoints are saved"}


# ---------------------------------------------------------------------------------------------
# 1. A finished run
# ---------------------------------------------------------------------------------------------
def finished_run(recipe: Recipe) -> Optional[Finished]:
    """:class:`Finished` when ``checkpoint.dir`` (with ``checkpoint.load``) holds a checkpoint at or
    past ``train.steps`` that a resume would start from, else None."""
    c = recipe.checkpoint
    if not (c.dir and c.load):
        return None
    it = finished_iteration(c.dir)
    if it is None or it < recipe.train.steps:
        return None
    return Finished(recipe.name, it, recipe.train.steps, iteration_dir(c.dir, it).resolve(),
                    _tracking_note(recipe, it))


def _tracking_note(recipe: Recipe, iteration: int) -> str:
    """The MLflow run that logged ``iteration``, from the run folder's ``metrics.jsonl`` (the run id
    is on every line), without asking MLflow; "" when tracking is off or the folder is elsewhere."""
    import json

    from v2pe_megatron.training.tracking import default_run_dir, resolve_tracking_uri

    run_dir = default_run_dir(recipe)
    if recipe.tracking.backend == "none" or not (recipe.tracking.tracking_uri or run_dir.is_dir()):
        return ""
    uri = resolve_tracking_uri(recipe)
    run_id = None
    metrics = run_dir / "metrics.jsonl"
    try:
        with open(metrics, "rb") as f:  # the last lines are the final steps: read the tail only
            f.seek(max(0, f.seek(0, os.SEEK_END) - (1 << 16)))
            for line in reversed(f.read().decode(errors="replace").splitlines()):
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if row.get("step") == iteration and row.get("run_id"):
                    run_id = row["run_id"]
                    break
    except OSError:
        pass
    if run_id is None:
        return f"its MLflow store: {uri}"
    return f"MLflow run {run_id} in {uri} (view: mlflow ui --backend-store-uri {uri})"


# ---------------------------------------------------------------------------------------------
# 2. The machine
# ---------------------------------------------------------------------------------------------
def check_runtime(recipe: Recipe) -> None:
    """NCCL and the TE spec where the machine cannot run them (torch imported only for these)."""
    if recipe.launcher.backend == "nccl":
        from v2pe_megatron.runtime.distributed import choose_backend

        try:
            choose_backend("nccl")
        except RuntimeError as e:
            raise PreflightError(str(e)) from None
    if recipe.model.spec == "te":
        from v2pe_megatron.parallel.layout import LayoutError, resolve_spec

        try:
            resolve_spec("te", recipe.model.dtype)
        except LayoutError as e:
            raise PreflightError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# 3. The checkpoint folder
# ---------------------------------------------------------------------------------------------
def check_checkpoint_dir(recipe: Recipe, *, warn: Optional[Warn] = None) -> None:
    """``checkpoint.dir`` (created at the first save if missing) can be written: a file is created and
    removed in it, or in the nearest folder above it that exists; nothing else is touched."""
    c = recipe.checkpoint
    if not c.dir:
        return
    fix = "set checkpoint.dir to a folder this job can write (or leave it empty for no checkpoints)"
    why = unwritable_dir(c.dir)
    if why is not None:
        raise PreflightError(f"checkpoint.dir={c.dir}: {why}, so the run would fail at its first save: {fix}")
    there = Path(c.dir)
    while not there.exists() and there != there.parent:
        there = there.parent
    _warn_free_space(recipe, there, warn or log.warning)


def _warn_free_space(recipe: Recipe, there: Path, warn: Warn) -> None:
    from v2pe_megatron.plan import GIB, checkpoint_bytes

    c, t = recipe.checkpoint, recipe.train
    one = checkpoint_bytes(recipe.model, optimizer=recipe.optimizer.name,
                           distributed_optimizer=recipe.parallel.use_distributed_optimizer)
    saves = (t.steps // c.save_interval + (t.steps % c.save_interval > 0)) if c.save_interval else 1
    # A save is written whole before keep_last prunes the older ones; what is there already counts.
    at_once = min(saves, c.keep_last + 1) if c.keep_last else saves
    existing = len(saved_iterations(c.dir)) if Path(c.dir).is_dir() else 0
    need = max(1, at_once - existing) * one
    free = shutil.disk_usage(there).free
    if free < need:
        warn(f"checkpoint.dir={c.dir}: {free / GIB:.1f} GiB free on its file system, but this run's checkpoints "
             f"need about {need / GIB:.1f} GiB more ({max(1, at_once - existing)} of about {one / GIB:.2f} GiB each "
             f"for {recipe.model.dtype} weights and the {recipe.optimizer.name} state; checkpoint.keep_last="
             f"{c.keep_last}): a save will fail when the disk is full; free space, lower checkpoint.keep_last, "
             f"or choose another checkpoint.dir")


# ---------------------------------------------------------------------------------------------
# 4. Tokenizer and placeholders
# ---------------------------------------------------------------------------------------------
def unset_placeholders(recipe: Recipe, recipe_path: str | os.PathLike | None) -> dict[str, str]:
    """``{key: variable}`` for the recipe file's ``${oc.env:VAR,...}`` values whose variable is not
    set and whose key is still empty (an override on the command line fills it)."""
    if recipe_path is None or not Path(recipe_path).is_file():
        return {}
    from v2pe_megatron.config import flatten, to_dict

    values = flatten(to_dict(recipe))
    return {k: var for k, var in env_placeholders(recipe_path).items()
            if var not in os.environ and values.get(k) in ("", None)}


def check_tokenizer(recipe: Recipe, unset: Optional[dict[str, str]] = None) -> None:
    """Loads the tokenizer the run would use and compares its special-token ids and size with the
    model's (``data.chat.check_tokenizer``): a mismatch otherwise surfaces after the model and
    the optimizer were built."""
    from v2pe_megatron.data.chat import check_tokenizer as compare
    from v2pe_megatron.data.tokenizer import TokenizerError, build_tokenizer

    path = recipe.data.tokenizer_path
    var = (unset or {}).get("data.tokenizer_path")
    if path:
        where, fix = (f"data.tokenizer_path={path}",
                      f"give the tokenizer folder of model.preset={recipe.model.preset} (its tokenizer.json, or its "
                      f"tokenizer.model with added_tokens.json or tokenizer_config.json), or set the model's token "
                      f"ids to the tokenizer's")
    else:
        where = ("data.tokenizer_path is empty" + (f" ({var} is not set)" if var else "") +
                 ", so the built-in tiny tokenizer (made for model.preset=tiny) would be used")
        fix = ("set data.tokenizer_path to the model's tokenizer folder (tokenizer.json or tokenizer.model)" +
               (f" (export {var}=..., as the recipe's header says)" if var else "") +
               ", or the model's token ids to the tokenizer's")
    try:
        compare(recipe, build_tokenizer(path))
    except TokenizerError as e:  # unreadable files (either kind), missing or different ids
        raise PreflightError(f"{where}: {e}: {fix}") from None
