"""A pretraining run from a recipe: runtime, model, data, optimizer, steps, checkpoints, tracking.

Every rank validates the recipe against the real world size before building anything; the data
loader, the optimizer and the iteration are saved together so a resumed run continues exactly where
the saved one stopped. How a run ends (``runtime.exit_codes``): all ranks agree after every step, in
one collective, whether to stop (step/time budget, a stop signal on any rank, too many non-finite
steps in a row), then save once and exit with the same code. ``RESUME`` only when this run saved a
checkpoint of steps it trained: a stop signal before the first step, or with no ``checkpoint.dir``,
saved nothing new, and its code (``exit_codes.stopped``) must not make a job script requeue a run
that would only start over where this one did. A step with a non-finite loss or grad norm updates
nothing (``training.nonfinite``).
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from v2pe_megatron.config import Recipe, validate
from v2pe_megatron.data.skips import SkipCounter
from v2pe_megatron.data.skips import describe as describe_skips
from v2pe_megatron.parallel.layout import resolve_spec
from v2pe_megatron.runtime import distributed as rt
from v2pe_megatron.runtime import exit_codes
from v2pe_megatron.runtime.signals import StopSignals
from v2pe_megatron.training import checkpointing as ckpt
from v2pe_megatron.training import init_weights
from v2pe_megatron.training.engine import build_optimizer, train_step, wrap_ddp
from v2pe_megatron.training.forward import vlm_forward_step
from v2pe_megatron.training.metrics import StepMeter
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
    stop_reason: int = 0          # STOP_* (0: ran to the end)
    exit_code: int = exit_codes.SUCCESS
    nonfinite_steps: int = 0
    data_epoch: int = 0           # the data epoch the loader had reached (skip counters span 0..this)


def _scheduler(recipe: Recipe, optimizer) -> OptimizerParamScheduler:
    o, steps = recipe.optimizer, recipe.train.steps
    warmup = int(round(o.warmup_fraction * steps))
    # The recipe's schedule wins over a checkpoint's (override): a run extended by raising train.steps
    # decays over the new length instead of training the new steps at the old schedule's final lr.
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else o.lr, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(steps, warmup + 1), lr_decay_style=o.decay_style, start_wd=o.weight_decay,
        end_wd=o.weight_decay, wd_incr_steps=max(steps, 1), wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


# The schedule's keys in megatron's state dict, and the recipe key that sets each.
_SCHEDULE_KEYS = {"max_lr": "optimizer.lr", "min_lr": "optimizer.min_lr", "lr_warmup_steps": "optimizer.warmup_fraction",
                  "lr_decay_steps": "train.steps", "lr_decay_style": "optimizer.decay_style"}


def _restore_schedule(scheduler: OptimizerParamScheduler, saved: dict, rank0: bool) -> None:
    """The checkpoint's step count, the recipe's schedule; one warning when the two schedules differ."""
    changed = [f"{k} {saved[k]} -> {getattr(scheduler, k)} ({key})" for k, key in _SCHEDULE_KEYS.items()
               if k in saved and saved[k] != getattr(scheduler, k)]
    if changed and rank0:
        log.warning("the learning-rate schedule follows the recipe, not the checkpoint: %s", "; ".join(changed))
    scheduler.load_state_dict(saved)


def train(recipe: Recipe) -> RunSummary:
    """Run ``recipe`` on the current process group (torchrun, Slurm or a single process)."""
    from v2pe_megatron.data.loader import build_train_loader
    from v2pe_megatron.model.internvl import build_model

    t0 = time.time()
    t = recipe.train
    stop_signals = StopSignals().install()  # first: a signal during set-up still ends in a save
    with rt.process_group(recipe.launcher.backend, recipe.launcher.timeout_minutes):
        world = dist.get_world_size()
        layout = validate(recipe, world_size=world, spec=resolve_spec(recipe.model.spec, recipe.model.dtype))
        rank0 = dist.get_rank() == 0
        rt.initialize_model_parallel(layout.tp, layout.pp, layout.cp, seed=t.seed,
                                     hierarchical_cp_sizes=list(layout.hierarchical_cp_sizes) or None,
                                     timeout_minutes=recipe.launcher.timeout_minutes, vpp=layout.virtual_pp)
        c = recipe.checkpoint
        # Collective, before any model exists: which checkpoint (if any) this run continues from.
        resume_at = _find_resume(recipe, rank0) if c.dir else None
        resuming = resume_at is not None
        # One model chunk per virtual pipeline stage (interleaved schedule), else the stage's model.
        models = [build_model(recipe.model, layout, recompute=t.recompute,
                              vp_stage=i if layout.virtual_pp > 1 else None) for i in range(layout.virtual_pp)]
        # Weights come in before the optimizer exists: a bf16 optimizer copies them into its fp32
        # master weights when it is built.
        if not resuming and c.pretrained:
            src = ckpt.load_model_weights(c.pretrained, models)
            if rank0:
                log.info("starting from the weights in %s (new optimizer and schedule, step 0)", src)
        elif not resuming:  # the same weights at every layout, drawn shard by shard
            init_weights.initialize(models, t.seed)
        for m in models:
            m.freeze(vision=t.freeze_vision, projector=t.freeze_projector, language=t.freeze_language)
        nparams = sum(p.numel() for m in models for p in m.parameters())
        ddp = [wrap_ddp(m, m.config, use_distributed_optimizer=layout.distributed_optimizer, disable_bucketing=i > 0,
                        overlap_grad_reduce=layout.overlap_grad_reduce,
                        overlap_param_gather=layout.overlap_param_gather) for i, m in enumerate(models)]
        dtype = models[0].config.params_dtype
        optimizer = build_optimizer(recipe.optimizer, ddp, params_dtype=dtype,
                                    use_distributed_optimizer=layout.distributed_optimizer)
        scheduler = _scheduler(recipe, optimizer)
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        # Under CP each rank decodes only its share of every micro-batch's tiles.
        loader = build_train_loader(recipe, dp_rank=dp_rank, dp_size=dp, pad_multiple=layout.seq_multiple,
                                    cp_rank=ps.get_context_parallel_rank(), cp_size=layout.cp)
        d = recipe.data
        num_micro = d.global_batch_size // (d.micro_batch_size * dp)

        start, run_id, lineage = 0, None, []
        if resume_at is not None:
            t_load = time.time()
            start, extra = ckpt.load_checkpoint(c.dir, ddp, optimizer, iteration=resume_at, verified=True)
            # Every saved DP rank's state: the position is global, so any DP size resumes from it.
            loader.load_state_dict(extra["loader"])
            _restore_schedule(scheduler, extra["scheduler"], rank0)
            run_id = extra.get("mlflow_run_id")
            lineage = list(extra.get("lineage", [start]))
            if rank0:
                log.info("resumed from %s at step %d (%.1f s)", ckpt.iteration_dir(c.dir, start), start,
                         time.time() - t_load)
        tracker = Tracker(recipe, active=rank0, run_id=run_id,
                          tags={"layout": layout.describe(), "world_size": world})
        summary = RunSummary(0, start, world_size=world, layout=layout.describe(), parameters=nparams,
                             tracking_uri=tracker.uri, run_id=tracker.run_id)
        if rank0:
            log.info("recipe %s: %d ranks (%s), %.2fM parameters on rank 0, %d micro-batches of %d x %d "
                     "tokens per step", recipe.name, world, layout.describe(), nparams / 1e6, num_micro,
                     d.micro_batch_size, d.seq_length)
        it = iter(loader)
        meter = StepMeter(recipe, world_size=world, total_steps=t.steps, device=rt.device(),
                          dp_group=ps.get_data_parallel_group(with_context_parallel=False))
        status, saved_at = "FAILED", start if lineage else None
        nonfinite = NonFinite(t.max_nonfinite_steps)
        try:
            # Collective: a signal during set-up (model build, checkpoint load) stops the run before
            # its first step; nothing new would be saved, so training one step only to save it would
            # spend the scheduler's grace time for nothing.
            reason, signum = (_should_stop(recipe, 0, t0, signal_received=stop_signals.received, budget=False)
                              if start < recipe.train.steps else (0, 0))  # same start on every rank
            steps = range(start, recipe.train.steps) if reason != STOP_SIGNAL else range(0)
            if reason == STOP_SIGNAL:
                summary.stop_reason = reason
                if rank0:
                    log.info("stopping before step %d: %s before training started, nothing new to save",
                             start + 1, signal.Signals(signum).name)
            for step in steps:
                ts = time.time()
                res = train_step(ddp, optimizer, vlm_forward_step, meter.batches(it, num_micro),
                                 num_microbatches=num_micro, layout=layout, seq_length=d.seq_length,
                                 micro_batch_size=d.micro_batch_size)
                if res.update_successful:  # a skipped update leaves the LR schedule where it is
                    scheduler.step(increment=1)
                nonfinite.record(res, step + 1, rank0)
                dt = time.time() - ts
                summary.losses.append(res.loss)
                summary.steps_run += 1
                summary.final_step = step + 1
                skips = _global_skips(loader.skips)
                lr = optimizer.param_groups[0]["lr"]
                # Collective: the same figures (and step time) on every rank; an MFU above 100% raises on all.
                perf = meter.end_step(step + 1, dt, d.global_batch_size * d.seq_length)
                if rank0 and (step + 1) % recipe.train.log_interval == 0:
                    counted = describe_skips(skips)
                    log.info("step %d/%d  loss %.5f  lr %.3e  grad_norm %s  %s  step %.2fs%s",
                             step + 1, recipe.train.steps, res.loss, lr,
                             f"{res.grad_norm:.3f}" if res.grad_norm is not None else "n/a", meter.format(perf),
                             perf["step_time_s"], f"  {counted}" if counted else "")
                tracker.log_metrics({"loss": res.loss, "lr": lr, "grad_norm": res.grad_norm, **perf,
                                     "trained_tokens": res.num_tokens,
                                     "skipped/nonfinite_steps": nonfinite.total,
                                     **SkipCounter(skips).metrics()}, step=step + 1)
                if c.dir and c.save_interval and (step + 1) % c.save_interval == 0:
                    saved_at = _save(recipe, step + 1, ddp, optimizer, scheduler, loader, tracker, lineage)
                reason, signum = _should_stop(recipe, summary.steps_run, t0, signal_received=stop_signals.received,
                                              nonfinite=nonfinite.exhausted)
                if reason:
                    summary.stop_reason = reason
                    if rank0:
                        log.info("stopping after step %d: %s", step + 1,
                                 STOP_MESSAGES[reason] if c.dir or reason != STOP_SIGNAL else
                                 f"a stop signal; checkpoint.dir is not set, so nothing is saved (exit code "
                                 f"{exit_codes.stopped(signum)}: running again starts over at step 1)")
                    break
            if c.dir and summary.steps_run and saved_at != summary.final_step:
                _save(recipe, summary.final_step, ddp, optimizer, scheduler, loader, tracker, lineage)
            status = {STOP_SIGNAL: "KILLED", STOP_NONFINITE: "FAILED"}.get(summary.stop_reason, "FINISHED")
            summary.exit_code = {STOP_SIGNAL: exit_codes.RESUME,
                                 STOP_NONFINITE: exit_codes.NONFINITE}.get(summary.stop_reason, exit_codes.SUCCESS)
            if summary.stop_reason == STOP_SIGNAL and not (c.dir and summary.steps_run):
                summary.exit_code = exit_codes.stopped(signum)  # nothing new saved: not a resume request
        finally:
            tracker.close(status)
            summary.run_id = tracker.run_id  # created after the start when MLflow was down then
            stop_signals.restore()
            if hasattr(loader, "close"):
                loader.close()
        summary.skips = _global_skips(loader.skips)
        summary.data_epoch = int(loader.state_dict()["epoch"]) if hasattr(loader, "state_dict") else 0
        summary.nonfinite_steps = nonfinite.total
        summary.seconds = time.time() - t0
        return summary


STOP_BUDGET, STOP_SIGNAL, STOP_NONFINITE = 1, 2, 3  # ordered: the highest reason on any rank wins
STOP_MESSAGES = {STOP_BUDGET: "this job's step or time budget",
                 STOP_SIGNAL: f"a stop signal (saving, then exit code {exit_codes.RESUME}: run again to resume)",
                 STOP_NONFINITE: "too many non-finite steps in a row (train.max_nonfinite_steps; saving, then "
                                 f"exit code {exit_codes.NONFINITE})"}


class NonFinite:
    """Counts steps whose update was skipped for a non-finite loss or grad norm (same on all ranks)."""

    def __init__(self, limit: int):
        self.limit, self.total, self.in_a_row = limit, 0, 0

    def record(self, res, step: int, rank0: bool) -> None:
        if res.update_successful:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if rank0:
            log.warning("step %d: loss %s, grad norm %s: not finite, update skipped (%d in a row, %d in all; "
                        "the run stops at train.max_nonfinite_steps=%d in a row)", step, res.loss, res.grad_norm,
                        self.in_a_row, self.total, self.limit)

    @property
    def exhausted(self) -> bool:
        return self.limit > 0 and self.in_a_row >= self.limit


def _find_resume(recipe: Recipe, rank0: bool) -> Optional[int]:
    """Collective. The iteration to continue from (its manifest verified), or None to start at step 0.

    Refuses to start from scratch over existing checkpoints unless the recipe says so: a fresh run
    would overwrite them step by step."""
    c = recipe.checkpoint
    if rank0:
        ckpt.clean_stale_tmp(c.dir)
    dist.barrier()
    existing = ckpt.saved_iterations(c.dir)
    if not c.load:
        if existing and not c.overwrite:
            raise ckpt.CheckpointError(
                f"checkpoint.load=false but {c.dir} holds checkpoints (iterations {existing[:5]}"
                f"{'...' if len(existing) > 5 else ''}): set checkpoint.overwrite=true to start over in it "
                "(their iterations get overwritten as this run saves), or choose another checkpoint.dir")
        return None
    return ckpt.find_resumable(c.dir)


def _should_stop(recipe: Recipe, steps_run: int, t0: float, *, signal_received: Optional[int] = None,
                 nonfinite: bool = False, budget: bool = True) -> tuple[int, int]:
    """Collective, once per step: the stop reason all ranks agree on (0: go on), and the stop
    signal's number (0: none). A signal may have reached only some ranks, and rank clocks differ: the
    maximum over ranks decides (a rank that got no signal itself exits with the others' code)."""
    t = recipe.train
    reason = 0
    if budget and ((t.exit_after_steps and steps_run >= t.exit_after_steps) or
                   (t.wallclock_minutes and time.time() - t0 >= 60 * t.wallclock_minutes)):
        reason = STOP_BUDGET
    if signal_received:
        reason = STOP_SIGNAL
    if nonfinite:
        reason = STOP_NONFINITE
    flag = torch.tensor([float(reason), float(signal_received or 0)], device=rt.device())  # NCCL: device tensors
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    reason, signum = (int(v) for v in flag.tolist())
    return reason, signum


def _global_skips(local: dict[str, int]) -> dict[str, int]:
    """Skip counters summed over data-parallel ranks (all ranks call this)."""
    keys = sorted(local)
    t = torch.tensor([local[k] for k in keys], dtype=torch.float64, device=rt.device())
    if dist.is_initialized() and ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, group=ps.get_data_parallel_group(with_context_parallel=False))
    return {k: int(v) for k, v in zip(keys, t.tolist())}


def _save(recipe, step, ddp, optimizer, scheduler, loader, tracker, lineage: list[int]) -> int:
    """Collective; returns ``step``. ``lineage`` (the iterations this run and the runs it resumed
    from saved) gains ``step``; keep_last prunes only within it."""
    t = time.time()
    # Every DP rank's loader position travels in the checkpoint (gathered; rank 0's copy is written).
    states = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(states, loader.state_dict(), group=ps.get_data_parallel_group())
    run_id = [tracker.run_id]
    dist.broadcast_object_list(run_id, src=0)  # common checkpoint state must agree on all ranks
    lineage[:] = [i for i in lineage if i != step][-100:] + [step]
    extra = {"loader": states, "scheduler": scheduler.state_dict(), "mlflow_run_id": run_id[0],
             "lineage": list(lineage)}
    path = ckpt.save_checkpoint(recipe.checkpoint.dir, step, ddp, optimizer, extra=extra,
                                keep_last=recipe.checkpoint.keep_last, lineage=lineage, model_config=recipe.model,
                                seq_length=recipe.data.seq_length)
    if dist.get_rank() == 0:
        log.info("saved checkpoint %s at step %d (%.1f s)", path, step, time.time() - t)
    return step
