"""megatron-core's torch_dist writer keeps a helper process per rank; this keeps it in the rank.

``megatron.core.dist_checkpointing.strategies.filesystem_async.get_write_results_queue`` makes a
``multiprocessing.Manager().Queue()`` on first use: a spawned server process (~740 MB) that outlives
a rank killed by SIGKILL, for as long as nothing reaps it (30+ minutes seen). Our saves run the
writer synchronously in the rank itself, where a plain ``queue.Queue`` does the same job. The patch is
switched on by :func:`v2pe_megatron.training.checkpointing.save_checkpoint` before megatron's writer
runs, on every device: the cause is the writer, not the machine.
"""

from __future__ import annotations

import queue

from v2pe_megatron.runtime.patching import PatchSet

_patches = PatchSet(__name__)
_queue: queue.Queue = queue.Queue()


@_patches.patch
def write_results_queue_in_process() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    _patches.set(filesystem_async, "get_write_results_queue", lambda mp_mode="spawn": _queue)


PATCHES = _patches.patches
activate = _patches.activate
deactivate = _patches.deactivate
is_active = _patches.is_active
