"""Per-step throughput for the log line and MLflow: tokens/s, TFLOP/s per device, MFU, ETA.

FLOPs are counted from the micro-batches the step actually drew (sub-sample lengths from
``MicroBatch.seq_lens``, the pack's tiles from ``MicroBatch.pack_tiles``: under context parallelism a
rank decodes only its share of them, but the pack's ViT work is done, once, by the CP group) with
:mod:`v2pe_megatron.flops`, summed over the step's micro-batches and over data-parallel ranks; per
device = total / world size. MFU divides model FLOPs (recompute excluded) by the peak of the device
(``flops.peak_flops_for``: the recipe's ``train.peak_tflops``, else the bf16 table for bf16/fp16 runs
on a known GPU); without a peak it is left out of the line and of MLflow rather than guessed.

Every rank reports the same figures: one all-reduce over all ranks per step carries the FLOPs and
the step time, which each rank measured on its own clock; the step time is their mean. Ranks that
hold the same packs (the TP, PP and CP ranks of one data-parallel replica) all count them, so the
sum is divided by that number. A decision taken on these figures (MFU above 100%) is therefore taken
by every rank at the same step: all raise :class:`MFUError` together, none waits alone in the next
collective.
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
    reduction over ``dp_group``, the data-parallel group without CP, which may draw the step's
    micro-batches ahead); ``end_step(step, seconds, tokens)`` is collective over all ranks (every rank
    calls it with its own ``seconds``) and returns the same metrics on every rank. ``dp_group`` None
    in a process group of several ranks: they all hold the same packs (no data parallelism).
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
            self._tiles += b.pack_tiles
            yield b

    def _reduce(self, seconds: float) -> tuple[float, float, float]:
        """Collective: (model, hardware) FLOPs of the step over all data-parallel ranks and the step
        time all ranks agree on (the mean of theirs); resets the count."""
        local = flops.step_flops(self.model_cfg, self._lens, self._tiles, recompute=self.recompute)
        self._lens, self._tiles = [], 0
        t = torch.tensor([local.model, local.hardware, seconds], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            dp = dist.get_world_size(self.dp_group) if self.dp_group is not None else 1
            dist.all_reduce(t)
            # world / dp ranks (TP x PP x CP) drew the same packs and counted them each.
            t /= torch.tensor([world / dp, world / dp, world], dtype=torch.float64, device=t.device)
        model, hardware, seconds = t.tolist()
        return model, hardware, seconds

    def end_step(self, step: int, seconds: float, tokens: int) -> dict[str, float]:
        """Collective. ``seconds``: this rank's time for the step; the figures use the ranks' mean."""
        model, hardware, seconds = self._reduce(seconds)
        self._times.append(seconds)
        per_device = model / self.world_size / seconds
        out = {"tokens_per_s": tokens / seconds, "tflops_per_device": per_device / 1e12,
               "hw_tflops_per_device": hardware / self.world_size / seconds / 1e12,
               "step_flops": model, "step_time_s": seconds}
        if self.peak:
            mfu = 100.0 * per_device / self.peak
            if mfu > 100.0:  # the same numbers on every rank: all ranks raise here, at the same step
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
