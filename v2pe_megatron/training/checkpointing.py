"""Atomic, verified torch_dist checkpoints of model + optimizer + random generators (+ any extra
state), loadable at another layout, with a cost per rank that shrinks as 1/DP.

Layout on disk::

    <dir>/iter_0000010/                one megatron dist_checkpointing (torch_dist) checkpoint
    <dir>/iter_0000010/model.yaml      the recipe's model section (what check_model_matches names keys from)
                                       and data.seq_length (the trained range v2pe-eval's delta rule keeps to)
    <dir>/iter_0000010/manifest.json   relative path, size and sha256 of every other file in it
    <dir>/latest                       text file with the last *complete* iteration

A checkpoint is written to ``iter_XXXXXXX.tmp``; when every rank finished writing, the manifest is
written (the last file of a save), the folder is renamed and only then ``latest`` moves. So a job
killed at any moment, also mid-save, leaves ``latest`` naming a complete checkpoint. Model weights are
saved from the inner module's ``sharded_state_dict()`` (not the DDP wrapper's), which megatron
reshards on load to any TP/PP layout. The distributed optimizer's state is in megatron's
``fully_reshardable`` layout (model-space tensors: it loads across TP, PP, CP and DP changes), written
and read by every DP rank for the parameter ranges it owns (``training/optimizer_state.py``; megatron's
own writer for that layout gathers the whole state on every rank). Each rank's random generators are
saved at its grid coordinates and restored at the same layout (``training/rng_state.py``).

Saves and loads run through megatron's fully parallel strategy wrappers over the data-parallel (with
context-parallel) group: what is replicated there (the model weights, a non-distributed optimizer)
is written once, spread over the DP ranks, and on load each rank reads a 1/DP share and receives
the rest from the others. Peak host memory and bytes read per rank thus fall as 1/DP
(``benchmarks/checkpoint.py``).

Loading verifies the manifest before anything is read, because torch distributed checkpointing
unpickles ``.metadata``: a truncated or swapped file is caught before it is parsed. The manifest
proves a checkpoint whole, not who wrote it: training checkpoints are trusted artifacts (foreign
weights come in through ``v2pe-convert``, roadmap step 8, which reads safetensors only). A damaged
checkpoint is reported by name and the previous complete one is used (``find_resumable``); every
other load (``load_model_weights``, ``export-hf``) follows the same rule (``checkpoint_folder``).
Before any of them builds a model, ``check_model_matches`` compares the checkpoint's tensor shapes
(its metadata) with the recipe's model, and names the keys that differ. A save that fails removes its
partial folder; a full disk is said as such, with the sizes.

Hashing is spread over the ranks: on save each rank hashes the files it wrote itself (torch_dist
names them ``__<rank>_<n>.distcp``), on verify the files are dealt out by size, so the bytes hashed
per rank shrink with the job. Saving runs megatron's writer in this process: its default keeps a
``multiprocessing`` manager process per rank (hundreds of MB) that outlives a killed rank.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

from v2pe_megatron.model import checkpoint_names
from v2pe_megatron.runtime import megatron_writer
from v2pe_megatron.training import optimizer_state, rng_state
# The folder's names and the manifest's name-and-size check are torch-free (the CLI checks a folder
# before it imports torch); re-exported here, where every caller has always found them.
from v2pe_megatron.training.checkpoint_files import (MANIFEST, CheckpointError, files_in, iteration_dir,  # noqa: F401
                                                     latest_iteration, manifest_problem, saved_iterations,
                                                     weights_dir)
from v2pe_megatron.training.param_sync import sync_params

# How the optimizer state is laid out (megatron's content metadata; checkpoints without it were
# written in this layout too).
OPTIM_SHARDING = {"distrib_optim_sharding_type": optimizer_state.SHARDING_TYPE}

log = logging.getLogger("v2pe_megatron.train")


class ModelMismatch(CheckpointError):
    """A checkpoint of another model than the one the recipe (or model yaml) describes: bad input,
    found from the checkpoint's metadata before any model is built."""


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module


def _model_sd(model: list[torch.nn.Module]) -> dict:
    """The model's sharded state dict; with virtual pipeline chunks one sub-dict per chunk. The
    tensors' checkpoint keys are global (layer numbers included), so what a chunk is called here never
    reaches the file: a checkpoint written with chunks loads without and vice versa."""
    if len(model) == 1:
        return unwrap(model[0]).sharded_state_dict()
    return {f"chunk{i}": unwrap(m).sharded_state_dict() for i, m in enumerate(model)}


def _load_model_sd(model: list[torch.nn.Module], sd: dict) -> None:
    if len(model) == 1:
        unwrap(model[0]).load_state_dict(sd, strict=True)
        return
    for i, m in enumerate(model):
        unwrap(m).load_state_dict(sd[f"chunk{i}"], strict=True)


def clean_stale_tmp(ckpt_dir: str | os.PathLike) -> list[str]:
    """Rank 0, before a run saves anything: remove ``iter_*.tmp`` folders of killed saves."""
    removed = []
    for p in sorted(Path(ckpt_dir).glob("iter_*.tmp")):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    if removed:
        log.info("removed %d incomplete checkpoint folder(s) of an interrupted save in %s: %s", len(removed),
                 ckpt_dir, ", ".join(removed))
    return removed


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _dp_group():
    """The group over which model weights (and a non-distributed optimizer) are replicated."""
    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        return None
    return ps.get_data_parallel_group(with_context_parallel=True)


def _save_strategy():
    """megatron's torch_dist writer, the saving of what the DP ranks share spread over them."""
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    group = _dp_group()
    base = TorchDistSaveShardedStrategy()
    return base if group is None else FullyParallelSaveStrategyWrapper(base, group)


def _load_strategy():
    """megatron's torch_dist reader; each DP rank reads a share of what they all need and receives
    the rest from the others (``exchange_algo="broadcast"``: per tensor, no gathered copy)."""
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    group = _dp_group()
    base = TorchDistLoadShardedStrategy()
    return base if group is None else FullyParallelLoadStrategyWrapper(base, group)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


_WRITER = re.compile(r"__(\d+)_\d+\.distcp$")


def _hashed_by(names: list[str], world: int) -> list[list[str]]:
    """Who hashes which file after a save: torch_dist's ``__<rank>_<n>.distcp`` files by the rank
    that wrote them (still in its page cache, on its node), the few others round-robin."""
    out: list[list[str]] = [[] for _ in range(world)]
    rest = []
    for n in names:
        m = _WRITER.search(n)
        (out[int(m.group(1))] if m and int(m.group(1)) < world else rest).append(n)
    for i, n in enumerate(rest):
        out[i % world].append(n)
    return out


def _dealt_by_size(files: dict, world: int) -> list[list[str]]:
    """Files dealt out to ``world`` ranks, largest first to the least loaded (the same on every rank)."""
    load, out = [0] * world, [[] for _ in range(world)]
    for name in sorted(files, key=lambda n: (-int(files[n].get("size") or 0), n)):
        r = min(range(world), key=lambda i: (load[i], i))
        out[r].append(name)
        load[r] += int(files[name].get("size") or 0)
    return out


def write_manifest(folder: Path) -> None:
    """Collective: every rank hashes the files it wrote, rank 0 writes the manifest (fsynced)."""
    names = [files_in(folder) if _rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(names, src=0)
    mine = {n: {"size": (folder / n).stat().st_size, "sha256": _sha256(folder / n)}
            for n in _hashed_by(names[0], _world())[_rank()]}
    entries = {k: v for part in _gather(mine) for k, v in part.items()}
    if _rank() == 0:
        tmp = folder / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"version": 1, "files": dict(sorted(entries.items()))}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(folder / MANIFEST)
        _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(folder: Path, *, contents: bool = True, quiet: bool = False) -> Optional[str]:
    """Collective. None when ``folder`` matches its manifest, else why not (the same on every rank).
    Sizes are checked by every rank, contents (sha256) by one rank each, dealt out by size.

    ``contents=False`` hashes only the small files (everything but torch_dist's ``*.distcp`` data):
    enough to read the checkpoint's metadata safely (``.metadata`` is unpickled), at no cost.
    Files the manifest does not list (``notes.txt``, ``.DS_Store``) are never read by a load: they
    are named in a warning (unless ``quiet``) and do not make the checkpoint damaged."""
    problem, files = manifest_problem(folder)
    if problem is None:  # sizes agree: the expensive part, spread over the ranks
        hashed = files if contents else {n: m for n, m in files.items() if not n.endswith(".distcp")}
        names = _dealt_by_size(hashed, _world())[_rank()]
        bad = next((n for n in names if _sha256(folder / n) != files[n].get("sha256")), None)
        problem = f"{bad} does not match its sha256 in the manifest" if bad else None
    problems = [x for x in _gather(problem) if x]
    if not problems and not quiet:
        extra = sorted(set(files_in(folder)) - set(files))
        if extra:
            _warn(f"{folder}: ignoring {len(extra)} file(s) the manifest does not list (not part of the "
                  f"checkpoint, never read): {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    return problems[0] if problems else None


def find_resumable(ckpt_dir: str | os.PathLike, *, contents: bool = True, quiet: bool = False) -> Optional[int]:
    """Collective. The iteration to resume from: ``latest`` if it verifies, else the newest older
    checkpoint that does (each rejected one is named in a warning). None when the folder holds no
    checkpoint at all; CheckpointError when it holds some and none verifies (never a silent restart;
    the error names each one, once). ``contents``/``quiet``: see :func:`verify` (``quiet``: no
    warnings, for a check before the run that makes the same choice again and says it then).

    ``latest`` is followed also when a newer complete checkpoint exists (a save killed between its
    rename and the update of ``latest``, or ``latest`` set back by hand to roll back): a warning says
    which one is used, why, and how to use the newer one instead."""
    warn = (lambda msg: None) if quiet else _warn
    saved = saved_iterations(ckpt_dir)
    try:
        latest = latest_iteration(ckpt_dir)
        if latest is None and saved:
            warn(f"{Path(ckpt_dir) / 'latest'} is missing although {ckpt_dir} holds checkpoints; "
                 f"looking for the newest complete one")
    except CheckpointError as e:
        latest = None
        warn(f"{e}; looking for the newest complete checkpoint instead")
    if latest is None and not saved:
        return None
    candidates = ([latest] if latest is not None else []) + \
        [i for i in reversed(saved) if latest is None or i < latest]
    rejected = []
    for it in candidates:
        problem = verify(iteration_dir(ckpt_dir, it), contents=contents, quiet=quiet)
        if problem is None:
            for bad in rejected:  # named only when something else is used: else the error names them
                warn(f"skipping damaged checkpoint {bad}")
            if rejected:
                warn(f"resuming from {iteration_dir(ckpt_dir, it)}, the newest complete checkpoint")
            if it == latest and not quiet:
                _warn_newer_complete(ckpt_dir, it, saved)
            return it
        rejected.append(f"{iteration_dir(ckpt_dir, it)}: {problem}")
    raise CheckpointError(f"no usable checkpoint in {ckpt_dir}: " + "; ".join(rejected) +
                          " (delete them, or set checkpoint.load=false checkpoint.overwrite=true to start over)",
                          collective=True)


def _warn_newer_complete(ckpt_dir, latest: int, saved: list[int]) -> None:
    """Collective. Warn when a checkpoint newer than ``latest`` is complete (its files match the
    manifest's sizes and its small files their hashes)."""
    newer = next((i for i in reversed(saved) if i > latest
                  and verify(iteration_dir(ckpt_dir, i), contents=False, quiet=True) is None), None)
    if newer is not None:
        _warn(f"{Path(ckpt_dir) / 'latest'} names iteration {latest}, but {iteration_dir(ckpt_dir, newer)} is "
              f"newer and complete (a save stopped between its rename and the update of latest, or latest "
              f"was set back by hand): using iteration {latest}, as latest says. To continue from {newer} "
              f"instead, write {newer} into {Path(ckpt_dir) / 'latest'}; otherwise a save of this run at "
              f"step {newer} replaces it")


def _warn(msg: str) -> None:
    if _rank() == 0:
        log.warning(msg)


def save_checkpoint(ckpt_dir: str | os.PathLike, iteration: int, model: list[torch.nn.Module],
                    optimizer=None, extra: Optional[dict[str, Any]] = None, keep_last: int = 0,
                    lineage: Optional[list[int]] = None, model_config=None,
                    seq_length: Optional[int] = None) -> Path:
    """Collective: every rank calls it. Returns the final directory.

    ``keep_last`` > 0 deletes older checkpoints of ``lineage`` (the iterations this run and the
    runs it resumed from wrote, oldest first) beyond the newest ``keep_last``; nothing else is ever
    deleted, in particular no checkpoint of another run and nothing above ``iteration``.

    ``model``: the DDP-wrapped chunks; with the distributed optimizer's overlapped parameter gather,
    the last update is held only in each rank's shard until the next forward, so the weights are
    made whole first (``engine.sync_params``).

    ``model_config``: the recipe's model section, recorded as ``model.yaml`` in the checkpoint (what
    :func:`check_model_matches` names keys from, and ``export-hf`` reads), with ``seq_length``, the
    recipe's ``data.seq_length``, as its ``data`` section (``v2pe-eval``'s default trained range).

    A save that fails (a full disk: torch's zip writer says ``unexpected pos``) removes its partial
    ``.tmp`` folder and raises a CheckpointError that names the cause and the sizes; the previous
    checkpoint and ``latest`` are untouched.
    """
    sync_params(model)
    final = iteration_dir(ckpt_dir, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    rng = rng_state.capture()  # first: nothing below may draw before the states are taken
    megatron_writer.activate()  # no helper process may outlive a killed rank
    model_sd = _model_sd(model)
    state: dict[str, Any] = {"model": model_sd, "iteration": iteration, "extra": extra or {}}
    if optimizer is not None:
        _ensure_optimizer_state(optimizer)
        state["optimizer"], _ = optimizer_state.sharded_state_dict(optimizer, model_sd, is_loading=False,
                                                                   metadata=OPTIM_SHARDING)
    state[rng_state.KEY] = rng_state.sharded(rng)
    needed = sum(_gather(_state_bytes(state)))
    try:
        dist_checkpointing.save(state, str(tmp), sharded_strategy=_save_strategy(),
                                content_metadata={**OPTIM_SHARDING, rng_state.LAYOUT_KEY: rng_state.layout()})
        rng_state.restore(rng)  # a save draws nothing: a run that saves draws what one that does not would
        _barrier()
        if model_config is not None and _rank() == 0:
            _write_model_yaml(tmp, model_config, seq_length)
        write_manifest(tmp)  # the last act of a save: a folder with a valid manifest is complete
    except BaseException as e:  # torch's CheckpointException is a BaseException
        err = _failed_save(e, ckpt_dir, tmp, needed)
        if err is e:
            raise
        raise err from e
    _barrier()
    if _rank() == 0:
        replaced = final.with_name(final.name + ".replaced.tmp")  # a kill leaves it to clean_stale_tmp
        if final.exists():  # an overwritten run's checkpoint: out of the way by rename, deleted last
            final.rename(replaced)
        tmp.rename(final)
        _fsync_dir(Path(ckpt_dir))
        marker = Path(ckpt_dir) / "latest.tmp"
        marker.write_text(str(iteration))
        marker.replace(Path(ckpt_dir) / "latest")
        shutil.rmtree(replaced, ignore_errors=True)
        if keep_last > 0 and lineage:
            older = sorted({i for i in lineage if i < iteration})
            for old in older[:max(0, len(older) - (keep_last - 1))]:
                shutil.rmtree(iteration_dir(ckpt_dir, old), ignore_errors=True)
    _barrier()
    return final


def _write_model_yaml(folder: Path, mc, seq_length: Optional[int] = None) -> None:
    """The recipe's model section, as ``v2pe-convert import-hf`` records it (a recipe file), and the
    sequence length trained at (``checkpoint_files.recorded_seq_length`` reads it back)."""
    import yaml

    section = dataclasses.asdict(mc)
    section.pop("preset", None)  # resolved: the keys say it all
    doc: dict[str, Any] = {"model": section}
    if seq_length is not None:
        doc["data"] = {"seq_length": int(seq_length)}
    (folder / MODEL_YAML).write_text("# The model section this checkpoint was trained with and its data.seq_length "
                                     "(v2pe-train).\n" + yaml.safe_dump(doc, sort_keys=False))


def _state_bytes(state: dict) -> int:
    """Bytes of tensor data this rank's part of a save writes (main replicas: each written once)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica

    n = 0
    for t in nested_values(state):
        if isinstance(t, (ShardedTensor, ShardedTensorFactory)) and t.data is not None \
                and is_main_replica(t.replica_id):
            n += t.data.numel() * t.data.element_size()
    return n


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def exception_causes(e: BaseException):
    """``e``, its causes and contexts, and the per-rank failures torch's CheckpointException carries
    (megatron's save re-raises a writer's failure inside one): where a save's real error is found."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__]
        for f in (getattr(x, "failures", None) or {}).values():
            todo.append(f[0] if isinstance(f, tuple) else f)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def _failed_save(e: BaseException, ckpt_dir, tmp: Path, needed: int) -> BaseException:
    """After a failed save on this rank: its partial folder removed (the save is lost on every rank;
    removing it twice is harmless), and the exception to raise. A full disk (ENOSPC or EDQUOT anywhere
    in the chain, or less free space than the checkpoint needs: torch's zip writer reports a short
    write as ``[enforce fail at inline_container.cc] unexpected pos``) becomes a CheckpointError
    with the sizes; anything else is raised as it is."""
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
        return e
    try:
        kept = latest_iteration(ckpt_dir)
    except CheckpointError:
        kept = None
    if kept is not None:  # a checkpoint of this run is the better measure (files, headers, metadata)
        try:
            files = json.loads((iteration_dir(ckpt_dir, kept) / MANIFEST).read_text())["files"]
            needed = max(needed, sum(int(f.get("size") or 0) for f in files.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    try:
        free = shutil.disk_usage(ckpt_dir).free
    except OSError:
        free = None
    full = any(getattr(x, "errno", None) in _DISK_FULL for x in exception_causes(e)) or \
        (free is not None and free < needed)
    if not full:
        return e
    previous = (f"The previous checkpoint {iteration_dir(ckpt_dir, kept)} is kept: free space (or point "
                f"checkpoint.dir at a larger disk) and run the same command to resume from it"
                if kept is not None else "No earlier checkpoint exists: free space or point checkpoint.dir at "
                                         "a larger disk")
    return CheckpointError(
        f"saving checkpoint {tmp.name.removesuffix('.tmp')} failed: no space left on device in {ckpt_dir} "
        f"(the checkpoint needs at least {_gib(needed)}, {_gib(free) if free is not None else 'unknown'} free "
        f"after removing the partial {tmp.name}). {previous}",
        collective=any(type(x).__name__ == "CheckpointException" for x in exception_causes(e)))


def load_checkpoint(ckpt_dir: str | os.PathLike, model: list[torch.nn.Module], optimizer=None,
                    iteration: Optional[int] = None, *, verified: bool = False) -> tuple[int, dict[str, Any]]:
    """Collective. Verifies (unless ``verified``: ``iteration`` came from ``find_resumable``), then
    loads weights (and optimizer state) in place; returns (iteration, extra)."""
    if iteration is None:
        iteration, verified = find_resumable(ckpt_dir), True
        if iteration is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    path = iteration_dir(ckpt_dir, iteration)
    problem = None if verified else verify(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
    content = dist_checkpointing.load_content_metadata(str(path)) or {}
    model_sd = _model_sd(model)
    state: dict[str, Any] = {"model": model_sd}
    load_optimizer = _optimizer_sd(optimizer, model_sd, content, state)
    with_rng = rng_state.restorable(content)
    if with_rng:
        state[rng_state.KEY] = rng_state.sharded(rng_state.capture())
    loaded = dist_checkpointing.load(checkpoint_names.retarget(state, path), str(path),
                                    sharded_strategy=_load_strategy())
    _load_model_sd(model, loaded["model"])
    if optimizer is not None:
        load_optimizer(loaded["optimizer"])
    if with_rng:  # last: nothing after it may draw before training goes on
        rng_state.restore(loaded[rng_state.KEY])
    else:
        rng_state.reseed(content, iteration, _rank() == 0)
    return int(loaded.get("iteration", iteration)), dict(loaded.get("extra", {}))


def _optimizer_sd(optimizer, model_sd: dict, content: dict, state: dict):
    """Adds the optimizer's part of a load request to ``state`` in the checkpoint's own layout
    (its content metadata; checkpoints without one are ``OPTIM_SHARDING``); returns what puts the
    loaded part back into the optimizer."""
    if optimizer is None:
        return None
    _ensure_optimizer_state(optimizer)
    metadata = {k: v for k, v in content.items() if k != rng_state.LAYOUT_KEY} or dict(OPTIM_SHARDING)
    state["optimizer"], load = optimizer_state.sharded_state_dict(optimizer, model_sd, is_loading=True,
                                                                  metadata=metadata)
    return load or optimizer.load_state_dict


def checkpoint_folder(path: str | os.PathLike, *, contents: bool = True, quiet: bool = False) -> Path:
    """Collective. The torch_dist folder ``path`` names, verified by the rule a resume follows:

    - a training ``checkpoint.dir`` (``latest`` or ``iter_*`` folders, no ``metadata.json``): the
      iteration :func:`find_resumable` picks (``latest`` if complete, else the newest complete one,
      with warnings);
    - an ``iter_*`` folder, or any folder with a manifest (``v2pe-convert import-hf`` writes one):
      verified, CheckpointError naming the problem if damaged;
    - a weights folder without a manifest (``save_model_weights``): as it is.

    ``contents``/``quiet``: see :func:`verify`. Raises like :func:`weights_dir` for what is no
    checkpoint at all."""
    p = Path(path)
    if p.is_dir() and not (p / "metadata.json").is_file() and ((p / "latest").is_file() or saved_iterations(p)):
        it = find_resumable(p, contents=contents, quiet=quiet)
        if it is None:
            raise CheckpointError(f"{p} holds no checkpoint", collective=True)
        return iteration_dir(p, it)
    p = weights_dir(p)
    if (p / MANIFEST).is_file() or _ITERATION.fullmatch(p.name):
        problem = verify(p, contents=contents, quiet=quiet)
        if problem is not None:
            raise CheckpointError(f"checkpoint {p} is damaged: {problem}", collective=True)
    return p


_ITERATION = re.compile(r"iter_\d+")


def load_model_weights(path: str | os.PathLike, model: torch.nn.Module | list[torch.nn.Module]) -> Path:
    """Weights only (collective), resharded to this rank's layout; returns the folder read (see
    :func:`checkpoint_folder`: verified, a damaged latest falls back as a resume does). An optimizer
    built before this call keeps stale master weights: load first."""
    p = checkpoint_folder(path)
    chunks = model if isinstance(model, list) else [model]
    loaded = dist_checkpointing.load(checkpoint_names.retarget({"model": _model_sd(chunks)}, p), str(p),
                                    sharded_strategy=_load_strategy())
    _load_model_sd(chunks, loaded["model"])
    return p


# ---------------------------------------------------------------------------------------------
# Is it a checkpoint of this model? (before any model is built)
# ---------------------------------------------------------------------------------------------
MODEL_YAML = "model.yaml"  # the model section a checkpoint was written with (v2pe-convert, save_checkpoint)


def model_shapes(configs: list) -> list[Optional[dict[str, tuple[tuple[int, ...], bool]]]]:
    """Checkpoint key -> (global shape, vocabulary-padded) of every weight tensor of each model
    config (None for one after the first that cannot be built), as megatron's ``sharded_state_dict``
    of the whole model (TP = PP = 1) names them: the model is built on the ``meta`` device (no memory,
    no weights) in a 1-rank gloo group of its own, so this runs before any process group exists (and
    only then). Layer tensors are stacked over the layers, as stored. On a GPU machine megatron's
    layers make a CUDA context (on ``LOCAL_RANK``'s device), so a process that only starts ranks
    leaves this to them (``cli.checkpoint_check.checks_here``)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import Layout
    from v2pe_megatron.runtime.distributed import process_group

    if dist.is_initialized():
        raise RuntimeError("model_shapes builds its meta models in a process group of its own: call it "
                           "before any process group exists")
    if torch.cuda.is_available():  # megatron's layers ask for the current device even on meta: the rank's own
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    out: list = []
    # gloo on a store of its own (no port to agree on); of the generators only megatron's tracker,
    # which its layers fork while they are made (nothing is drawn on meta)
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    with process_group("gloo", environ={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, store=store):
        from megatron.core import tensor_parallel

        ps.initialize_model_parallel(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        for i, mc in enumerate(configs):
            try:
                # the names on disk are the same for both specs (model.checkpoint_names): local needs no TE
                sd = build_model(mc, Layout(spec="local"), pre_process=True, post_process=True, meta=True) \
                    .sharded_state_dict()
            except Exception:
                if i == 0:
                    raise
                out.append(None)  # a variation that is no model of its own: its shapes differ
                continue
            apply_factories(sd)
            out.append({t.key: (tuple(t.global_shape), bool(t.allow_shape_mismatch))
                        for t in nested_values(sd) if isinstance(t, ShardedTensor)})
    return out


def shape_mismatches(expected: dict[str, tuple[tuple[int, ...], bool]], stored: dict[str, tuple[int, ...]],
                     mc) -> list[str]:
    """What differs between a model's tensors (``model_shapes``) and a checkpoint's (key -> global
    shape), one line each. Vocabulary-padded tensors (embedding, output layer) hold the vocabulary
    padded to a multiple of the TP size it was saved at: at least ``vocab_size`` rows, fewer than
    ``vocab_size + num_query_groups`` (TP divides the KV heads)."""
    out = []
    for key, (shape, padded) in expected.items():
        at = checkpoint_names.stored_name(key, stored)
        if at not in stored:
            out.append(f"{key}: not in the checkpoint, the model has {shape}")
            continue
        got = tuple(stored[at])
        if padded:
            vocab, groups = mc.language.vocab_size, mc.language.num_query_groups
            ok = got[1:] == shape[1:] and vocab <= got[0] < vocab + groups
        else:
            ok = got == shape
        if not ok:
            out.append(f"{key}: {got} in the checkpoint, {shape} in the model")
    roots = {k.split(".", 1)[0] + "." for k in expected}
    claimed = {checkpoint_names.stored_name(k, stored) for k in expected}
    out += [f"{k}: in the checkpoint, not in the model" for k in sorted(stored)
            if k.startswith(tuple(roots)) and k not in claimed]
    return out


def recorded_model(folder: Path):
    """The ModelConfig a checkpoint folder records in its ``model.yaml``, or None."""
    from v2pe_megatron.config import RecipeError, load_recipe

    f = folder / MODEL_YAML
    if not f.is_file():
        return None
    try:
        return load_recipe(f).model
    except RecipeError:
        return None


def _differing_keys(a, b) -> list[str]:
    from v2pe_megatron.config import flatten

    fa, fb = flatten(dataclasses.asdict(a)), flatten(dataclasses.asdict(b))
    return [k for k in fa if k != "preset" and fa.get(k) != fb.get(k)]


def _with_value(mc, key: str, value):
    out = copy.deepcopy(mc)
    *path, last = key.split(".")
    obj = out
    for k in path:
        obj = getattr(obj, k)
    setattr(obj, last, value)
    return out


def check_model_matches(path: str | os.PathLike, mc, *, what: str, mine: str = "the recipe") -> Path:
    """Refuse a checkpoint of another model, before any model is built: compares the tensors the
    model ``mc`` has (:func:`model_shapes`) with those in the checkpoint's metadata; returns the
    folder that a load would read. Raises :class:`ModelMismatch` with one message: the model keys
    that differ (from the checkpoint's ``model.yaml`` when it has one, reduced to the keys that change
    tensor shapes), else the tensors. ``what`` names the checkpoint as the user gave it
    (``checkpoint.pretrained=...``, ``--ckpt ...``), ``mine`` the model section (``the recipe``,
    ``--model-yaml FILE``). The folder is verified first (sizes and small files: its metadata is
    unpickled) by the rule the load follows (:func:`checkpoint_folder`); the load verifies it whole."""
    folder = checkpoint_folder(path, contents=False, quiet=True)
    stored = {k: tuple(t.global_shape) for k, t in dist_checkpointing.load_tensors_metadata(str(folder)).items()}
    ours, = model_shapes([mc])
    problems = shape_mismatches(ours, stored, mc)
    if not problems:
        return folder
    where = what if str(folder) in what else f"{what}: {folder}"
    recorded = recorded_model(folder)
    keys = _differing_keys(recorded, mc) if recorded is not None else []
    # the keys that change a shape: each tried alone on our model (spec, dtype, ... change none)
    tried = model_shapes([mc] + [_with_value(mc, k, _get(recorded, k)) for k in keys])[1:] if keys else []
    named = [k for k, s in zip(keys, tried) if s != ours]
    if named:
        raise ModelMismatch(
            f"{where} is a checkpoint of another model: "
            + "; ".join(f"model.{k} is {_get(recorded, k)!r} there, {_get(mc, k)!r} in {mine}" for k in named)
            + f". Set {'this key' if len(named) == 1 else 'these keys'} as the checkpoint has "
              f"{'it' if len(named) == 1 else 'them'} ({folder / MODEL_YAML} holds its model section), "
              f"or use a checkpoint of this model")
    raise ModelMismatch(
        f"{where} is a checkpoint of another model; its tensors differ from {mine}'s model section: "
        + "; ".join(problems[:4]) + (f"; ... ({len(problems)} tensors in all)" if len(problems) > 4 else "")
        + ". Give the model section (model.preset, model.*) the checkpoint was written with, "
          "or use a checkpoint of this model")


def _get(mc, key: str):
    obj = mc
    for k in key.split("."):
        obj = getattr(obj, k)
    return obj


def check_recipe_checkpoint(recipe) -> None:
    """The checkpoint a run of ``recipe`` would load (its own ``checkpoint.dir`` to resume, else
    ``checkpoint.pretrained``, the order ``training.loop.train`` follows), checked against the
    recipe's model before any rank starts: :func:`check_model_matches`. Raises ModelMismatch (bad
    input) or CheckpointError (nothing usable to resume from)."""
    c = recipe.checkpoint
    resume_at = find_resumable(c.dir, contents=False, quiet=True) if c.dir and c.load and Path(c.dir).is_dir() else None
    if resume_at is not None:
        check_model_matches(iteration_dir(c.dir, resume_at), recipe.model, what=f"checkpoint.dir={c.dir} (resuming)")
    elif c.pretrained:
        check_model_matches(c.pretrained, recipe.model, what=f"checkpoint.pretrained={c.pretrained}")


def save_model_weights(path: str | os.PathLike, model: torch.nn.Module | list[torch.nn.Module]) -> None:
    """Weights only (collective); the directory is created. Written like a training checkpoint:
    spread over the DP ranks, by megatron's writer inside each rank."""
    if _rank() == 0:
        Path(path).mkdir(parents=True, exist_ok=True)
    _barrier()
    megatron_writer.activate()
    dist_checkpointing.save({"model": _model_sd(model if isinstance(model, list) else [model])}, str(path),
                            sharded_strategy=_save_strategy())
    _barrier()


def _ensure_optimizer_state(optimizer) -> None:
    """torch Adam creates its state lazily at the first step; a checkpoint (or a load target) needs
    it to exist. megatron's optimizers provide ``init_state_fn`` for exactly this."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        init = getattr(opt, "init_state_fn", None)
        if inner is None or init is None or any(len(s) for s in inner.state.values()):
            continue
        try:
            init(inner, opt.config)
        except TypeError:
            init(inner)
