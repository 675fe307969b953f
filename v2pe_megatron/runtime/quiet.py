"""Library messages a user of ``v2pe-train`` cannot act on, silenced at their source.

Before step 1 every rank used to print ~30 lines of warnings from megatron-core, torch and MLflow
that are about how those libraries are packaged or about their own internals, not about the run. They
buried the lines that matter (a skipped sample, an unreachable tracking server, a bad checkpoint).
:func:`quiet_library_warnings` silences exactly the ones listed in :data:`SILENCED`, each matched by
its message *and* its category or logger, so any other warning from the same libraries still shows.
The CLIs call it first thing; library users (notebooks, tests) are not affected unless they call it.

What is silenced, and why nobody can act on it:

- megatron "Transformer Engine and Apex are not installed ..." / "Apex is not installed ...":
  expected on CPU and on GPU machines without apex; the fallbacks are the ones this project uses
  (TE is the ``gpu`` extra and ``model.spec`` decides, apex is optional).
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

Kept: everything else, e.g. data skips, NaN steps, DALI falling back to Pillow, tracking problems,
checkpoint fallbacks, and any new library warning.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

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


def quiet_library_warnings() -> None:
    """Silence :data:`SILENCED` and :data:`SILENCED_LOGS` in this process (idempotent). Call it before
    megatron / torch.distributed are imported: several of these are emitted at import time."""
    for pattern, category in SILENCED:
        warnings.filterwarnings("ignore", message=pattern, category=category)  # deduplicated by warnings
    for name, pattern in SILENCED_LOGS:
        f = _log_filters.setdefault((name, pattern), _DropMessages(pattern))
        logger = logging.getLogger(name)
        if f not in logger.filters:
            logger.addFilter(f)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
