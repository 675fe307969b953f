"""Atomic torch_dist checkpoints of model + optimizer (+ any extra state), loadable at another layout.

Layout on disk::

    <dir>/iter_0000010/      one megatron dist_checkpointing (torch_dist) checkpoint
    <dir>/latest             text file with the last *complete* iteration

A checkpoint is written to ``iter_XXXXXXX.tmp`` and renamed only after every rank finished, so a
job killed mid-save leaves the previous checkpoint as ``latest``. Model weights are saved from the
inner module's ``sharded_state_dict()`` (not the DDP wrapper's), which megatron reshards on load to
any TP/PP layout; the distributed optimizer state uses the ``fully_reshardable`` format so it can be
resumed across TP and DP changes too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

OPTIM_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


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


def iteration_dir(ckpt_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(ckpt_dir) / f"iter_{iteration:07d}"


def latest_iteration(ckpt_dir: str | os.PathLike) -> Optional[int]:
    f = Path(ckpt_dir) / "latest"
    if not f.is_file():
        return None
    text = f.read_text().strip()
    if not text.isdigit() or not iteration_dir(ckpt_dir, int(text)).is_dir():
        raise RuntimeError(f"{f} names iteration {text!r}, which has no complete checkpoint in {ckpt_dir}")
    return int(text)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(ckpt_dir: str | os.PathLike, iteration: int, model: list[torch.nn.Module],
                    optimizer=None, extra: Optional[dict[str, Any]] = None, keep_last: int = 0) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    final = iteration_dir(ckpt_dir, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd = _model_sd(model)
    state: dict[str, Any] = {"model": model_sd, "iteration": iteration, "extra": extra or {}}
    if optimizer is not None:
        _ensure_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=OPTIM_SHARDING)
    dist_checkpointing.save(state, str(tmp), content_metadata=OPTIM_SHARDING)
    _barrier()
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        marker = Path(ckpt_dir) / "latest.tmp"
        marker.write_text(str(iteration))
        marker.replace(Path(ckpt_dir) / "latest")
        if keep_last > 0:
            done = sorted(p for p in Path(ckpt_dir).glob("iter_*") if not p.name.endswith(".tmp"))
            for old in done[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(ckpt_dir: str | os.PathLike, model: list[torch.nn.Module], optimizer=None,
                    iteration: Optional[int] = None) -> tuple[int, dict[str, Any]]:
    """Collective. Loads weights (and optimizer state) in place; returns (iteration, extra)."""
    if iteration is None:
        iteration = latest_iteration(ckpt_dir)
        if iteration is None:
            raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir} (no 'latest' file)")
    path = iteration_dir(ckpt_dir, iteration)
    model_sd = _model_sd(model)
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        _ensure_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIM_SHARDING)
    loaded = dist_checkpointing.load(state, str(path))
    _load_model_sd(model, loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    return int(loaded.get("iteration", iteration)), dict(loaded.get("extra", {}))


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
    loaded = dist_checkpointing.load({"model": _model_sd(chunks)}, str(p))
    _load_model_sd(chunks, loaded["model"])
    return p


def save_model_weights(path: str | os.PathLike, model: torch.nn.Module | list[torch.nn.Module]) -> None:
    """Weights only (collective); the directory is created."""
    if _rank() == 0:
        Path(path).mkdir(parents=True, exist_ok=True)
    _barrier()
    dist_checkpointing.save({"model": _model_sd(model if isinstance(model, list) else [model])}, str(path))
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
