"""A pretraining run from a recipe: runtime, model, data, optimizer, steps, checkpoints, tracking.

This is the first cut of the loop (the roadmap's step 6 hardens it: signals, wall-clock budget, NaN
handling, MFU). What it already guarantees: every rank validates the recipe against the real world
size before building anything; the data loader, the optimizer and the iteration are saved together
so a resumed run continues exactly where the saved one stopped.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from v2pe_megatron.config import Recipe, validate
from v2pe_megatron.parallel.layout import resolve_spec
from v2pe_megatron.runtime import distributed as rt
from v2pe_megatron.training import checkpointing as ckpt
from v2pe_megatron.training import init_weights
from v2pe_megatron.training.engine import build_optimizer, train_step, wrap_ddp
from v2pe_megatron.training.forward import vlm_forward_step
from v2pe_megatron.training.tracking import Tracker

log = logging.getLogger("v2pe_megatron.train")


@dataclass
class RunSummary:
    steps_run: int
    final_step: int
    losses: list[float] = field(default_factory=list)
    skips: dict[str, int] = field(default_factory=dict)
    world_size: int = 1
    layout: str = ""
    parameters: int = 0
    tracking_uri: Optional[str] = None
    run_id: Optional[str] = None
    seconds: float = 0.0


def _scheduler(recipe: Recipe, optimizer) -> OptimizerParamScheduler:
    o, steps = recipe.optimizer, recipe.train.steps
    warmup = int(round(o.warmup_fraction * steps))
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else o.lr, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(steps, warmup + 1), lr_decay_style=o.decay_style, start_wd=o.weight_decay,
        end_wd=o.weight_decay, wd_incr_steps=max(steps, 1), wd_incr_style="constant")


def train(recipe: Recipe) -> RunSummary:
    """Run ``recipe`` on the current process group (torchrun, Slurm or a single process)."""
    from v2pe_megatron.data.loader import build_train_loader
    from v2pe_megatron.model.internvl import build_model

    t0 = time.time()
    t = recipe.train
    with rt.process_group(recipe.launcher.backend, recipe.launcher.timeout_minutes):
        world = dist.get_world_size()
        layout = validate(recipe, world_size=world, spec=resolve_spec(recipe.model.spec))
        rank0 = dist.get_rank() == 0
        rt.initialize_model_parallel(layout.tp, layout.pp, layout.cp, seed=t.seed,
                                     hierarchical_cp_sizes=list(layout.hierarchical_cp_sizes) or None,
                                     timeout_minutes=recipe.launcher.timeout_minutes, vpp=layout.virtual_pp)
        c = recipe.checkpoint
        resuming = bool(c.dir and c.load and ckpt.latest_iteration(c.dir) is not None)
        # One model chunk per virtual pipeline stage (interleaved schedule), else the stage's model.
        models = [build_model(recipe.model, layout, recompute=t.recompute,
                              vp_stage=i if layout.virtual_pp > 1 else None) for i in range(layout.virtual_pp)]
        # Weights come in before the optimizer exists: a bf16 optimizer copies them into its fp32
        # master weights when it is built.
        if not resuming and c.pretrained:
            src = ckpt.load_model_weights(c.pretrained, models)
            if rank0:
                log.info("starting from the weights in %s (new optimizer and schedule, step 0)", src)
        elif not resuming and init_weights.layout_dependent(layout):
            init_weights.load_reference_init(recipe, models)
        for m in models:
            m.freeze(vision=t.freeze_vision, projector=t.freeze_projector, language=t.freeze_language)
        nparams = sum(p.numel() for m in models for p in m.parameters())
        ddp = [wrap_ddp(m, m.config, use_distributed_optimizer=layout.distributed_optimizer, disable_bucketing=i > 0)
               for i, m in enumerate(models)]
        dtype = models[0].config.params_dtype
        optimizer = build_optimizer(recipe.optimizer, ddp, params_dtype=dtype,
                                    use_distributed_optimizer=layout.distributed_optimizer)
        scheduler = _scheduler(recipe, optimizer)
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        loader = build_train_loader(recipe, dp_rank=dp_rank, dp_size=dp, pad_multiple=layout.seq_multiple)
        d = recipe.data
        num_micro = d.global_batch_size // (d.micro_batch_size * dp)

        start, run_id = 0, None
        if resuming:
            start, extra = ckpt.load_checkpoint(c.dir, ddp, optimizer)
            # Every saved DP rank's state: the position is global, so any DP size resumes from it.
            loader.load_state_dict(extra["loader"])
            scheduler.load_state_dict(extra["scheduler"])
            run_id = extra.get("mlflow_run_id")
            if rank0:
                log.info("resumed from %s at step %d", c.dir, start)
        tracker = Tracker(recipe, active=rank0, run_id=run_id)
        summary = RunSummary(0, start, world_size=world, layout=layout.describe(), parameters=nparams,
                             tracking_uri=tracker.uri, run_id=tracker.run_id)
        if rank0:
            log.info("recipe %s: %d ranks (%s), %.2fM parameters on rank 0, %d micro-batches of %d x %d "
                     "tokens per step", recipe.name, world, layout.describe(), nparams / 1e6, num_micro,
                     d.micro_batch_size, d.seq_length)
        it = iter(loader)
        status = "FAILED"
        try:
            for step in range(start, recipe.train.steps):
                ts = time.time()
                res = train_step(ddp, optimizer, vlm_forward_step, it, num_microbatches=num_micro, layout=layout,
                                 seq_length=d.seq_length, micro_batch_size=d.micro_batch_size)
                scheduler.step(increment=1)
                if not math.isfinite(res.loss):
                    raise FloatingPointError(f"loss is {res.loss} at step {step + 1}")
                dt = time.time() - ts
                summary.losses.append(res.loss)
                summary.steps_run += 1
                summary.final_step = step + 1
                skips = _global_skips(loader.skips)
                lr = optimizer.param_groups[0]["lr"]
                tokens_per_s = d.global_batch_size * d.seq_length / dt
                if rank0 and (step + 1) % recipe.train.log_interval == 0:
                    log.info("step %d/%d  loss %.5f  lr %.3e  grad_norm %s  tokens/s %.0f  step %.2fs%s",
                             step + 1, recipe.train.steps, res.loss, lr,
                             f"{res.grad_norm:.3f}" if res.grad_norm is not None else "n/a", tokens_per_s, dt,
                             ("  skipped " + ", ".join(f"{k}={v}" for k, v in skips.items() if v)) if any(
                                 skips.values()) else "")
                tracker.log_metrics({"loss": res.loss, "lr": lr, "grad_norm": res.grad_norm,
                                     "tokens_per_s": tokens_per_s, "step_time_s": dt,
                                     "trained_tokens": res.num_tokens,
                                     **{f"skipped/{k}": v for k, v in skips.items()}}, step=step + 1)
                if c.dir and c.save_interval and (step + 1) % c.save_interval == 0:
                    _save(recipe, step + 1, ddp, optimizer, scheduler, loader, tracker)
                if _should_stop(recipe, summary.steps_run, t0):
                    if rank0:
                        log.info("stopping after step %d (this job's step or time budget)", step + 1)
                    break
            if c.dir and summary.steps_run:
                _save(recipe, summary.final_step, ddp, optimizer, scheduler, loader, tracker)
            status = "FINISHED"
        finally:
            tracker.close(status)
            if hasattr(loader, "close"):
                loader.close()
        summary.skips = _global_skips(loader.skips)
        summary.seconds = time.time() - t0
        return summary


def _should_stop(recipe: Recipe, steps_run: int, t0: float) -> bool:
    t = recipe.train
    stop = (t.exit_after_steps and steps_run >= t.exit_after_steps) or \
        (t.wallclock_minutes and time.time() - t0 >= 60 * t.wallclock_minutes)
    flag = torch.tensor([1.0 if stop else 0.0], device=rt.device())  # NCCL takes device tensors only
    if dist.is_initialized():  # rank clocks differ: all ranks stop together
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _global_skips(local: dict[str, int]) -> dict[str, int]:
    """Skip counters summed over data-parallel ranks (all ranks call this)."""
    keys = sorted(local)
    t = torch.tensor([local[k] for k in keys], dtype=torch.float64, device=rt.device())
    if dist.is_initialized() and ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, group=ps.get_data_parallel_group(with_context_parallel=False))
    return {k: int(v) for k, v in zip(keys, t.tolist())}


def _save(recipe, step, ddp, optimizer, scheduler, loader, tracker) -> None:
    # Every DP rank's loader position travels in the checkpoint (gathered; rank 0's copy is written).
    states = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(states, loader.state_dict(), group=ps.get_data_parallel_group())
    run_id = [tracker.run_id]
    dist.broadcast_object_list(run_id, src=0)  # common checkpoint state must agree on all ranks
    extra = {"loader": states, "scheduler": scheduler.state_dict(), "mlflow_run_id": run_id[0]}
    ckpt.save_checkpoint(recipe.checkpoint.dir, step, ddp, optimizer, extra=extra,
                         keep_last=recipe.checkpoint.keep_last)
