"""The torch_dist writer's results queue stays in the rank: without the patch megatron starts a
``multiprocessing`` manager process, which would outlive a rank killed by SIGKILL. Training
checkpoints and ``save_model_weights`` (weights-only folders, the reference init) both switch it on."""

from __future__ import annotations

import queue

import psutil
import pytest

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


def _children_around_weight_saves(path: str) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing import tiny
    from v2pe_megatron.training import checkpointing as ckpt

    megatron_writer.deactivate()
    filesystem_async._results_queue = None  # as in a fresh process: no queue made yet
    out = {}
    with model_parallel(1, 1):
        model = tiny.build_language_model(tiny.tiny_recipe())
        before = _children()
        ckpt.save_model_weights(f"{path}/ours", model)
        out["ours"] = sorted(_children() - before)
        out["active"] = megatron_writer.is_active()
        # the same save through megatron's default writer: a manager process appears
        megatron_writer.deactivate()
        filesystem_async._results_queue = None
        dist_checkpointing.save({"model": model.sharded_state_dict()}, f"{path}/plain")
        out["plain"] = sorted(_children() - before)
        for pid in out["plain"]:
            psutil.Process(pid).kill()
    return out


@pytest.mark.slow
def test_save_model_weights_leaves_no_helper_process(tmp_path):
    from v2pe_megatron.testing.distributed import run_distributed

    (tmp_path / "ours").mkdir()
    (tmp_path / "plain").mkdir()
    out = run_distributed(_children_around_weight_saves, 1, str(tmp_path))[0]
    assert out["ours"] == [] and out["active"], out
    assert out["plain"], "megatron's default writer made no helper process: this test would prove nothing"
