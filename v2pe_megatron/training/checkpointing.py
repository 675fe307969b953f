"""Atomic, verified torch_dist checkpoints of model + optimizer + random generators (+ any extra
state), loadable at another layout, with a cost per rank that shrinks as 1/DP.

Layout on disk::

    <dir>/iter_0000010/                one megatron dist_checkpointing (torch_dist) checkpoint
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
checkpoint is reported by name and the previous complete one is used (``find_resumable``).

Hashing is spread over the ranks: on save each rank hashes the files it wrote itself (torch_dist
names them ``__<rank>_<n>.distcp``), on verify the files are dealt out by size, so the bytes hashed
per rank shrink with the job. Saving runs megatron's writer in this process: its default keeps a
``multiprocessing`` manager process per rank (hundreds of MB) that outlives a killed rank.
"""

from __future__ import annotations

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
                                                     latest_iteration, manifest_problem, saved_iterations)
from v2pe_megatron.training.param_sync import sync_params

# How the optimizer state is laid out (megatron's content metadata; checkpoints without it were
# written in this layout too).
OPTIM_SHARDING = {"distrib_optim_sharding_type": optimizer_state.SHARDING_TYPE}

log = logging.getLogger("v2pe_megatron.train")


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


def verify(folder: Path) -> Optional[str]:
    """Collective. None when ``folder`` matches its manifest, else why not (the same on every rank).
    Sizes are checked by every rank, contents (sha256) by one rank each, dealt out by size."""
    problem, files = manifest_problem(folder)
    if problem is None:  # sizes agree: the expensive part, spread over the ranks
        names = _dealt_by_size(files, _world())[_rank()]
        bad = next((n for n in names if _sha256(folder / n) != files[n].get("sha256")), None)
        problem = f"{bad} does not match its sha256 in the manifest" if bad else None
    problems = [x for x in _gather(problem) if x]
    return problems[0] if problems else None


def find_resumable(ckpt_dir: str | os.PathLike) -> Optional[int]:
    """Collective. The iteration to resume from: ``latest`` if it verifies, else the newest older
    checkpoint that does (each rejected one is named in a warning). None when the folder holds no
    checkpoint at all; CheckpointError when it holds some and none verifies (never a silent restart)."""
    saved = saved_iterations(ckpt_dir)
    try:
        latest = latest_iteration(ckpt_dir)
        if latest is None and saved:
            _warn(f"{Path(ckpt_dir) / 'latest'} is missing although {ckpt_dir} holds checkpoints; "
                  f"looking for the newest complete one")
    except CheckpointError as e:
        latest = None
        _warn(f"{e}; looking for the newest complete checkpoint instead")
    if latest is None and not saved:
        return None
    candidates = ([latest] if latest is not None else []) + \
        [i for i in reversed(saved) if latest is None or i < latest]
    rejected = []
    for it in candidates:
        problem = verify(iteration_dir(ckpt_dir, it))
        if problem is None:
            if rejected:
                _warn(f"resuming from {iteration_dir(ckpt_dir, it)}, the newest complete checkpoint")
            return it
        rejected.append(f"{iteration_dir(ckpt_dir, it)}: {problem}")
        _warn(f"skipping damaged checkpoint {iteration_dir(ckpt_dir, it)}: {problem}")
    raise CheckpointError(f"no usable checkpoint in {ckpt_dir}: " + "; ".join(rejected) +
                          " (delete them, or set checkpoint.load=false checkpoint.overwrite=true to start over)")


def _warn(msg: str) -> None:
    if _rank() == 0:
        log.warning(msg)


def save_checkpoint(ckpt_dir: str | os.PathLike, iteration: int, model: list[torch.nn.Module],
                    optimizer=None, extra: Optional[dict[str, Any]] = None, keep_last: int = 0,
                    lineage: Optional[list[int]] = None) -> Path:
    """Collective: every rank calls it. Returns the final directory.

    ``keep_last`` > 0 deletes older checkpoints of ``lineage`` (the iterations this run and the
    runs it resumed from wrote, oldest first) beyond the newest ``keep_last``; nothing else is ever
    deleted, in particular no checkpoint of another run and nothing above ``iteration``.

    ``model``: the DDP-wrapped chunks; with the distributed optimizer's overlapped parameter gather,
    the last update is held only in each rank's shard until the next forward, so the weights are
    made whole first (``engine.sync_params``).
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
    dist_checkpointing.save(state, str(tmp), sharded_strategy=_save_strategy(),
                            content_metadata={**OPTIM_SHARDING, rng_state.LAYOUT_KEY: rng_state.layout()})
    rng_state.restore(rng)  # a save draws nothing: a run that saves draws what one that does not would
    _barrier()
    write_manifest(tmp)  # the last act of a save: a folder with a valid manifest is complete
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


def weights_dir(path: str | os.PathLike) -> Path:
    """The torch_dist checkpoint that ``path`` names: itself (an ``iter_*`` folder or a weights-only
    folder), or, for a training checkpoint folder with a ``latest`` file, its latest iteration.
    Raises with the path and what is wrong before anything is read."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if not p.is_dir():
        raise NotADirectoryError(f"{p} is a file, not a checkpoint folder")
    if (p / "latest").is_file() and not (p / "metadata.json").is_file():
        it = latest_iteration(p)
        assert it is not None
        p = iteration_dir(p, it)
    if not (p / "metadata.json").is_file():
        raise ValueError(f"{p} is not a torch_dist checkpoint (no metadata.json): give an iter_* folder, a "
                         f"checkpoint folder with 'latest', or a weights folder as save_model_weights writes")
    return p


def load_model_weights(path: str | os.PathLike, model: torch.nn.Module | list[torch.nn.Module]) -> Path:
    """Weights only (collective), resharded to this rank's layout; returns the folder read (see
    :func:`weights_dir`). An optimizer built before this call keeps stale master weights: load first."""
    p = weights_dir(path)
    chunks = model if isinstance(model, list) else [model]
    loaded = dist_checkpointing.load(checkpoint_names.retarget({"model": _model_sd(chunks)}, p), str(p),
                                    sharded_strategy=_load_strategy())
    _load_model_sd(chunks, loaded["model"])
    return p


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
