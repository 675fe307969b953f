"""Per-step throughput for the log line and MLflow: tokens/s, TFLOP/s per device, MFU, ETA.

FLOPs are counted from the micro-batches the step actually drew (sub-sample lengths from
``MicroBatch.seq_lens``, tiles from ``pixel_values``) with :mod:`v2pe_megatron.flops`, summed over
the step's micro-batches and over data-parallel ranks; per device = total / world size. MFU divides
model FLOPs (recompute excluded) by the peak of the device (``flops.peak_flops_for``: the recipe's
``train.peak_tflops``, else the bf16 table for bf16/fp16 runs on a known GPU); without a peak it
is left out of the line and of MLflow rather than guessed.
"""

from __future__ import annotations

import datetime
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from v2pe_megatron import flops
from v2pe_megatron.parallel.batch import MicroBatch
from v2pe_megatron.training import loss as loss_reduction


class MFUError(ValueError):
    """Model FLOP/s above the device's peak: the FLOPs count or the peak is wrong."""


def device_name() -> Optional[str]:
    """The accelerator's name as the peak table keys it (None on the CPU)."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


class StepMeter:
    """Counts what each step drew and turns the step time into the step's throughput figures.

    ``batches(it, n)`` is the iterator to hand to ``train_step`` (it also applies the recipe's loss
    reduction, which may draw the step's micro-batches ahead); ``end_step(step, seconds, tokens)``
    all-reduces the count over ``dp_group`` (every rank calls it) and returns the metrics.
    """

    def __init__(self, recipe: Any, *, world_size: int, total_steps: int,
                 dp_group=None, device: Optional[torch.device] = None, name: Optional[str] = None):
        self.model_cfg = recipe.model
        self.recompute = recipe.train.recompute
        self.reduction = recipe.train.loss_reduction
        self.world_size = world_size
        self.total_steps = total_steps
        self.dp_group = dp_group
        self.device = device
        self.peak = flops.peak_flops_for(name if name is not None else device_name(), recipe.model.dtype,
                                         override_tflops=recipe.train.peak_tflops)
        self._lens: list[int] = []
        self._tiles = 0
        self._times: list[float] = []

    def batches(self, it: Iterator[MicroBatch], num_microbatches: int) -> Iterator[MicroBatch]:
        # Eager: a reduction that draws ahead does its collective here, before the schedule starts.
        src = loss_reduction.step_batches(it, num_microbatches, self.reduction, group=self.dp_group,
                                          device=self.device)
        return self._counted(src, num_microbatches)

    def _counted(self, src: Iterator[MicroBatch], num_microbatches: int) -> Iterator[MicroBatch]:
        for _ in range(num_microbatches):
            b = next(src)
            self._lens += [int(n) for row in b.seq_lens for n in (row.tolist() if hasattr(row, "tolist") else row)]
            self._tiles += 0 if b.pixel_values is None else int(b.pixel_values.shape[0])
            yield b

    def step_flops(self) -> tuple[float, float]:
        """(model, hardware) FLOPs of the step, over all data-parallel ranks; resets the count."""
        local = flops.step_flops(self.model_cfg, self._lens, self._tiles, recompute=self.recompute)
        self._lens, self._tiles = [], 0
        t = torch.tensor([local.model, local.hardware], dtype=torch.float64, device=self.device)
        if self.dp_group is not None and dist.is_initialized() and dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(t, group=self.dp_group)
        model, hardware = t.tolist()
        return model, hardware

    def end_step(self, step: int, seconds: float, tokens: int) -> dict[str, float]:
        model, hardware = self.step_flops()
        self._times.append(seconds)
        per_device = model / self.world_size / seconds
        out = {"tokens_per_s": tokens / seconds, "tflops_per_device": per_device / 1e12,
               "hw_tflops_per_device": hardware / self.world_size / seconds / 1e12,
               "step_flops": model}
        if self.peak:
            mfu = 100.0 * per_device / self.peak
            if mfu > 100.0:
                raise MFUError(f"MFU {mfu:.1f}% > 100% at step {step}: {model:.4g} model FLOPs over "
                               f"{self.world_size} device(s) in {seconds:.4g} s = {per_device / 1e12:.4g} TFLOP/s "
                               f"per device, peak {self.peak / 1e12:.4g} TFLOP/s (train.peak_tflops or the "
                               f"table in v2pe_megatron/flops.py)")
            out["mfu_pct"] = mfu
        # The job's first step pays for warm-up (allocator, first collectives): left out once others exist.
        times = self._times[1:] or self._times
        out["eta_s"] = (self.total_steps - step) * sum(times) / len(times)
        return out

    @staticmethod
    def format(m: dict[str, float]) -> str:
        parts = [f"tokens/s {m['tokens_per_s']:.0f}", f"TFLOP/s {m['tflops_per_device']:.3g}"]
        if "mfu_pct" in m:
            parts.append(f"MFU {m['mfu_pct']:.1f}%")
        parts.append(f"ETA {datetime.timedelta(seconds=round(m['eta_s']))}")
        return "  ".join(parts)
