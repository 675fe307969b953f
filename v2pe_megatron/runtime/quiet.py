"""Library messages a user of ``v2pe-train`` cannot act on, silenced at their source.

Before step 1 every rank used to print ~30 lines of warnings from megatron-core, torch and MLflow
that are about how those libraries are packaged or about their own internals, not about the run. They
buried the lines that matter (a skipped sample, an unreachable tracking server, a bad checkpoint).
:func:`quiet_library_warnings` silences exactly the ones listed in :data:`SILENCED`, each matched by
its message *and* its category or logger, so any other warning from the same libraries still shows.
The CLIs call it first thing; library users (notebooks, tests) are not affected unless they call it.

What is silenced, and why nobody can act on it:

- megatron "Transformer Engine and Apex are not installed ..." (four of them, one per fallback) /
  "Apex is not installed ...": expected on CPU, where the fallbacks are the ones this project uses.
  On a CUDA machine a missing (or broken) Transformer Engine does matter, and there one line of ours
  replaces megatron's four (:func:`kernel_notice`): what falls back, and what to install.
- megatron "absl.logging is not installed ...": megatron's own optional logger backend.
- megatron "full scope is deprecated ...": a default inside megatron's TransformerConfig (CUDA graphs
  are not used here).
- megatron "MimoModelConfig is experimental ...": emitted when megatron imports its MIMO models,
  which this project does not use.
- megatron log "Rewrapping ModuleSpec ...": about megatron's own layer specs.
- megatron log "MCore's async save is deprecated ...": megatron's checkpoint strategy internals;
  the checkpoint format is fixed by ``checkpoint.format``.
- torch log "No CUDA runtime is found, using CUDA_HOME=...": printed on import by
  ``torch.utils.cpp_extension`` on every CPU machine.
- torch.distributed.checkpoint "torch.distributed is disabled, unavailable or uninitialized ...",
  "The argument order of load has been changed ...", FutureWarning "Please use DTensor instead and
  we are deprecating ShardedTensor": megatron's checkpoint loading calls torch this way.
- MLflow's INFO lines (database migrations, system-metrics monitor start/stop): MLflow's own logger
  level defaults to WARNING here (``MLFLOW_LOGGING_LEVEL``, which a user may still set).
- On a machine without NVIDIA's driver only (:data:`SILENCED_ON_CPU`): megatron's "... it is
  recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS to 1 ...", which every
  tensor-parallel rank prints once when the variable is unset (under torchrun or a bare srun). It is
  about ordering CUDA kernels; on the CPU there are none. On a CUDA machine it stays: there it is a
  real speed fix (``runtime.launch`` and ``slurm/job.sh`` set the variable).

Kept: everything else, e.g. data skips, NaN steps, DALI falling back to Pillow, tracking problems,
checkpoint fallbacks, and any new library warning.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import sys
import warnings
from typing import Optional

# (message regex, warning category) for ``warnings.warn`` calls.
SILENCED: tuple[tuple[str, type[Warning]], ...] = (
    (r"Transformer Engine and Apex are not installed", UserWarning),
    (r"Apex is not installed", UserWarning),
    (r"absl\.logging is not installed", UserWarning),
    (r"full scope is deprecated", UserWarning),
    (r"MimoModelConfig is experimental", UserWarning),
    (r"torch\.distributed is disabled, unavailable or uninitialized", UserWarning),
    (r"The argument order of load has been changed", UserWarning),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
)

# Silenced only where no NVIDIA driver is present: advice about CUDA that cannot be acted on there.
SILENCED_ON_CPU: tuple[tuple[str, type[Warning]], ...] = (
    (r"When using .* it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS", UserWarning),
)

# (logger name, message regex) for ``logging`` records.
SILENCED_LOGS: tuple[tuple[str, str], ...] = (
    ("torch.utils.cpp_extension", r"No CUDA runtime is found"),
    ("megatron.core.transformer.transformer_layer", r"Rewrapping ModuleSpec"),
    ("megatron.core.dist_checkpointing.strategies.torch", r"MCore's async save is deprecated"),
)


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


_log_filters: dict[tuple[str, str], logging.Filter] = {}


_NOTICE_SHOWN = "V2PE_KERNEL_NOTICE_SHOWN"  # set once said: the ranks a launcher starts inherit it


def _nvidia_driver() -> bool:
    # Torch-free first look: a machine without NVIDIA's kernel driver is not asked (and does not
    # import torch here: `v2pe-train --print-sbatch` on a login node stays quick).
    return os.path.exists("/proc/driver/nvidia/version")


def kernel_notice() -> Optional[str]:
    """On a CUDA machine without a working Transformer Engine: one line saying what megatron-core
    falls back to and what to install (None on the CPU, or when TE loads)."""
    if not _nvidia_driver():
        return None
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    if importlib.util.find_spec("transformer_engine") is None:
        problem = "Transformer Engine is not installed"
    else:
        try:
            importlib.import_module("transformer_engine.pytorch")
            return None
        except Exception as e:  # noqa: BLE001 - e.g. a CUDA 12 build of TE next to a CUDA 13 torch
            problem = f"Transformer Engine does not load ({type(e).__name__}: {e})"
    adam = ("apex's fused Adam" if importlib.util.find_spec("apex") is not None else
            "torch's Adam (a slower optimizer step; runtime/torch_adam_checkpoint.py fixes its checkpoints)")
    return (f"{problem}: model.spec=auto runs megatron-core's local layers and the optimizer is {adam}. "
            "Install the gpu extra (built against this torch): pip install --no-build-isolation -c constraints.txt "
            "-e '.[gpu]'")


def quiet_library_warnings() -> None:
    """Silence :data:`SILENCED` and :data:`SILENCED_LOGS` in this process (idempotent), and say
    :func:`kernel_notice` once per job (rank 0, or the launching process) on stderr. Call it before
    megatron / torch.distributed are imported: several of these are emitted at import time."""
    for pattern, category in SILENCED + (() if _nvidia_driver() else SILENCED_ON_CPU):
        warnings.filterwarnings("ignore", message=pattern, category=category)  # deduplicated by warnings
    for name, pattern in SILENCED_LOGS:
        f = _log_filters.setdefault((name, pattern), _DropMessages(pattern))
        logger = logging.getLogger(name)
        if f not in logger.filters:
            logger.addFilter(f)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    rank0 = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"
    if rank0 and not os.environ.get(_NOTICE_SHOWN):
        notice = kernel_notice()
        if notice:
            print(f"v2pe-megatron: {notice}", file=sys.stderr, flush=True)
            os.environ[_NOTICE_SHOWN] = "1"
