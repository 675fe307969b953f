"""The torch_dist writer's results queue stays in the rank: without the patch megatron starts a
``multiprocessing`` manager process, which would outlive a rank killed by SIGKILL."""

from __future__ import annotations

import queue

import psutil

from v2pe_megatron.runtime import megatron_writer


def _children() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True)}


def test_results_queue_is_in_process_and_the_patch_is_needed():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    before = _children()
    megatron_writer.activate()
    try:
        assert isinstance(filesystem_async.get_write_results_queue(), queue.Queue)
        assert _children() == before
    finally:
        megatron_writer.deactivate()
    assert not megatron_writer.is_active()
    # without it: megatron's own queue lives in a spawned manager process
    saved = filesystem_async._results_queue
    try:
        filesystem_async._results_queue = None
        q = filesystem_async.get_write_results_queue()
        assert not isinstance(q, queue.Queue)
        assert _children() - before, "megatron made its results queue without a helper process"
    finally:
        mgr_children = _children() - before
        for pid in mgr_children:
            psutil.Process(pid).kill()
        filesystem_async._results_queue = saved
