"""Every rank's random-number generators in a checkpoint, so that a resumed run draws what the
uninterrupted run would have drawn (drop path in the ViT, any dropout).

What a rank draws from: python's ``random``, numpy's global generator, torch's CPU generator, the
CUDA generator of its device (drop path draws from it on a GPU) and megatron's tensor-parallel RNG
tracker (dropout inside TP regions; ``tensor_parallel.get_cuda_rng_tracker()``). The states differ
between ranks (different data, different draws), so each rank saves its own, as one ShardedObject
at its (PP, TP, CP, DP) coordinates (Megatron-LM saves ``rng_state`` the same way per (PP, TP) with
the DP ranks' states inside). The layout they were saved at goes into the checkpoint's content
metadata: only at the same layout does a rank have a saved state of its own to restore. At another
layout the states cannot carry over (other ranks, other draws); every rank then reseeds from the
run's seed and the step (``seed + step``, the same way as at start-up), so a resumed run is still
reproducible, and one warning says so.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Optional

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

KEY = "rng_state"
LAYOUT_KEY = "v2pe_rng_layout"  # in the checkpoint's content metadata

log = logging.getLogger("v2pe_megatron.train")


def layout() -> dict[str, int]:
    """This rank's grid, as recorded beside the states."""
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size(), "dp": ps.get_data_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1}


def capture() -> dict[str, Any]:
    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    return {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": {k: v.clone() if torch.is_tensor(v) else v for k, v in tracker.items()}}


def restore(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def sharded(state: dict[str, Any]) -> ShardedObject:
    """``state`` as this rank's own entry of the checkpoint (no replicas: every rank writes one)."""
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_context_parallel_world_size(), ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_context_parallel_rank(), ps.get_data_parallel_rank())
    return ShardedObject(KEY, state, shape, offset, replica_id=0)


def restorable(content_metadata: Optional[dict]) -> bool:
    """Whether the checkpoint holds states of this very layout (each rank then has its own)."""
    return (content_metadata or {}).get(LAYOUT_KEY) == layout()


def reseed(content_metadata: Optional[dict], iteration: int, rank0: bool) -> None:
    """For a checkpoint whose states this run cannot restore: every generator reseeded from
    ``seed + iteration`` (``seed`` as the run set it at start-up), the reason logged once."""
    saved = (content_metadata or {}).get(LAYOUT_KEY)
    if saved is None:
        why = "the checkpoint holds no random-generator states (written before they were saved)"
    else:
        why = (f"its random-generator states were saved at {_describe(saved)} and this run is {_describe(layout())}"
               ": other ranks, other draws")
    seed = torch.initial_seed() + iteration
    if rank0:  # a layout change is worth a warning; an old checkpoint is what it is
        log.log(logging.INFO if saved is None else logging.WARNING,
                "resuming at step %d: %s; reseeding every generator from the run's seed and the step (%d): "
                "reproducible, but random draws (drop path, dropout) differ from the saved run's", iteration, why, seed)
    from v2pe_megatron.runtime.distributed import seed_all

    seed_all(seed)


def _describe(grid: dict) -> str:
    return " ".join(f"{k.upper()}={grid.get(k)}" for k in ("tp", "pp", "cp", "dp", "vpp"))
