"""Making the weights whole between steps when the distributed optimizer's parameter all-gather is
deferred to the next forward (``parallel.overlap_param_gather``; ``training/engine.py`` explains the
overlap). Its own module because checkpointing needs it and the engine imports the recipe types.
"""

from __future__ import annotations

import torch

__all__ = ["sync_params"]


def sync_params(model: list[torch.nn.Module]) -> None:
    """Collective (data x context parallel group). Every rank's parameters whole again after steps
    whose all-gather is deferred to the next forward (``overlap_param_gather``): call before reading
    the weights between steps (checkpoint save, evaluation, comparing weights). A no-op otherwise."""
    for m in model:
        ddp_config = getattr(m, "ddp_config", None)
        if ddp_config is not None and ddp_config.overlap_param_gather:
            with torch.no_grad():
                m.start_param_sync(force_sync=True)
