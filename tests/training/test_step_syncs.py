"""``testing.step_syncs``' bookkeeping (the GPU run is ``test_gpu_syncs.py``): a sync is put in the phase
of the innermost frame that names one, and its site is the innermost frame outside torch."""

from __future__ import annotations

import traceback

from v2pe_megatron.testing.step_syncs import _site, phase_of

SP = "/x/site-packages/"
V = "/repo/v2pe_megatron/"


def _stack(*frames: tuple[str, str]) -> list[traceback.FrameSummary]:
    return [traceback.FrameSummary(f, 10 + i, name) for i, (f, name) in enumerate(frames)]


LOOP = (V + "training/loop.py", "train")
STEP = (V + "training/engine.py", "train_step")
SCHEDULE = (SP + "megatron/core/pipeline_parallel/schedules.py", "forward_backward_no_pipelining")


def test_phases_by_the_innermost_frame_that_names_one():
    model = (V + "model/internvl.py", "forward")
    assert phase_of(_stack(LOOP, STEP, SCHEDULE, (V + "training/forward.py", "vlm_forward_step"), model,
                           (SP + "torch/_tensor.py", "item"))) == "forward/backward"
    assert phase_of(_stack(LOOP, STEP, SCHEDULE, (V + "training/forward.py", "vlm_forward_step"),
                           (V + "training/forward.py", "prepare_batch"), (V + "parallel/packed_seq.py", "_rows"))
                    ) == "batch preparation"
    assert phase_of(_stack(LOOP, STEP, SCHEDULE, (V + "training/metrics.py", "_counted"),
                           (V + "data/loader.py", "__next__"))) == "data loader"
    assert phase_of(_stack(LOOP, STEP, (V + "training/nonfinite.py", "guarded_step"),
                           (SP + "megatron/core/optimizer/clip_grads.py", "get_grad_norm_fp32"))) == "optimizer step"
    assert phase_of(_stack(LOOP, STEP)) == "loss sum (train_step)"
    assert phase_of(_stack(LOOP, (V + "training/loop.py", "_should_stop"))) == "stop decision"
    assert phase_of(_stack(LOOP, (V + "training/loop.py", "_global_skips"))) == "skip counters"
    assert phase_of(_stack(LOOP, (V + "training/metrics.py", "end_step"))) == "step meter"
    assert phase_of(_stack(LOOP)) == "loop (other)"
    assert phase_of(_stack(("/elsewhere.py", "f"))) == "other"


def test_site_is_the_innermost_frame_outside_torch():
    frames = _stack(LOOP, (SP + "megatron/core/utils.py", "local_multi_tensor_l2_norm"),
                    (SP + "torch/_tensor.py", "__float__"))
    assert _site(frames) == "megatron/core/utils.py:11 (local_multi_tensor_l2_norm)"
    assert _site(_stack(LOOP, (V + "training/loop.py", "_should_stop"))) == "v2pe_megatron/training/loop.py:11 (_should_stop)"
    wheel = _stack(LOOP, ("/tmp/v2pe_device_site/megatron/core/optimizer/optimizer.py", "step_with_ready_grads"))
    assert _site(wheel) == "megatron/core/optimizer/optimizer.py:11 (step_with_ready_grads)"
