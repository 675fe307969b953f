"""The checkpoint checks the command-line tools run before they build a model or start a rank
(``training.checkpointing.check_model_matches``): one message, said once, and the exit code."""

from __future__ import annotations

import sys
from typing import Callable, Optional

from v2pe_megatron.cli.common import launch_rank, under_launcher
from v2pe_megatron.runtime import exit_codes


def refuse_unusable_checkpoint(prog: str, check: Callable[[], object]) -> Optional[int]:
    """Run ``check``; None when it passes. Else one line on stderr (from rank 0: every rank finds the
    same) and the exit code: USAGE for a checkpoint of another model or a path that is no checkpoint
    (bad input), ERROR for a folder whose checkpoints are all damaged."""
    from v2pe_megatron.training.checkpointing import CheckpointError, ModelMismatch

    try:
        check()
        return None
    except ModelMismatch as e:
        code, msg = exit_codes.USAGE, str(e)
    except CheckpointError as e:
        code, msg = exit_codes.ERROR, str(e)
    except (OSError, ValueError) as e:  # not a checkpoint folder at all; the message names the path
        code, msg = exit_codes.USAGE, str(e)
    if launch_rank() == 0:
        print(f"{prog}: {msg}", file=sys.stderr)
    return code


def checks_here(nproc: int) -> bool:
    """Whether this process runs the check. A parent that only starts ranks on a GPU machine leaves it
    to them (they run the same path first thing, before any model): megatron's layers make a CUDA
    context even for a meta build, which the parent would hold on GPU 0 for the whole run."""
    if under_launcher() or nproc <= 1:
        return True
    import torch

    return not torch.cuda.is_available()
