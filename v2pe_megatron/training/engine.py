"""One optimizer step through megatron-core's machinery: DDP wrapper, (distributed) optimizer and the
pipeline schedules. The training loop, the tests' parity runs and the demo all step through here, so
that what the tests prove is what training does.

Data-parallel communication overlaps compute by default, as in Megatron-LM's training loop
(``docs/parallelism.md``, "Overlapped data-parallel communication"):

- ``overlap_grad_reduce``: gradients live in buckets; a bucket's reduce-scatter (all-reduce without
  the distributed optimizer) starts in the last micro-batch's backward as soon as the bucket's last
  gradient is in, and ``finalize_model_grads`` waits for them all.
- ``overlap_param_gather`` (distributed optimizer): ``optimizer.step()`` updates only this rank's
  shard; the all-gather of the updated parameters runs during the next step's forward. Every rank
  issues all of it at the start of :func:`train_step`, in the order the forward reads the buckets,
  and each module waits for its own bucket (megatron's forward pre-hook) before it runs. Issued
  together, not module by module, because DP ranks run different modules (a text-only micro-batch
  skips the vision tower) and collectives must be issued in the same order on every rank. A
  parameter read outside its module's forward is read mid-gather: only a read whose value does not
  matter may do that (InternVL's zero-weighted sum over the vision tower on text-only micro-batches).
  Between steps a rank's parameters therefore hold the last update only in its own shard:
  :func:`sync_params` before reading them (checkpoint save, evaluation, comparisons).
- Gradient buckets are reduced in one fixed order on every rank (:class:`_InOrderGradReduce`), not
  in the order the rank's backward completes them, which depends on its data.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

from v2pe_megatron.config import OptimizerConfig
from v2pe_megatron.parallel.layout import Layout, param_gather_overlaps
from v2pe_megatron.runtime.distributed import device
from v2pe_megatron.training.nonfinite import guarded_step
from v2pe_megatron.training.param_sync import sync_params  # noqa: F401  (the engine's API, used by callers)


def wrap_ddp(model: torch.nn.Module, config: TransformerConfig, *, use_distributed_optimizer: bool = False,
             disable_bucketing: bool = False, overlap_grad_reduce: bool = True, overlap_param_gather: bool = True,
             bucket_size: Optional[int] = None) -> DistributedDataParallel:
    """megatron DDP with fp32 gradient buffers; per-token loss scaling is done in finalize_model_grads.

    ``overlap_grad_reduce``: reduce each gradient bucket during backward (module docstring);
    ``overlap_param_gather``: with the distributed optimizer and ``overlap_grad_reduce``, all-gather
    the updated parameters during the next forward instead of in ``optimizer.step()`` (ignored
    otherwise, like ``parallel.overlap_param_gather``). ``bucket_size``: parameters per bucket, None
    for megatron's default, max(40M, 1M x data-parallel size) (only the first pipeline stage's first
    model chunk is bucketed; megatron reduces the others in one piece). ``disable_bucketing``: for
    every model chunk but the first of an interleaved pipeline (as megatron does: each is reduced in
    one piece once its last backward is done)."""
    gather = param_gather_overlaps(use_distributed_optimizer, overlap_grad_reduce, overlap_param_gather)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce, overlap_param_gather=gather,
        # The pre-hook only waits: train_step issues every bucket's all-gather itself (module docstring).
        align_param_gather=gather, use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False, average_in_collective=False, bucket_size=bucket_size)
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model,
                                  disable_bucketing=disable_bucketing)
    if overlap_grad_reduce and len(ddp.bucket_groups) > 1:
        _InOrderGradReduce(list(reversed(_gather_order(ddp))))
    if gather:
        # megatron registers the pre-hooks at construction; they are on only inside train_step's forward
        # passes, so a forward anywhere else (evaluation, a test) never starts a collective of its own.
        ddp.disable_forward_pre_hook(param_sync=False)
    return ddp


def _gather_order(ddp: DistributedDataParallel) -> list:
    """The bucket groups in the order the forward first reads their parameters: the inner module's
    ``parameters_in_forward_order()`` when it has one (InternVL: the vision tower comes second, not
    after the whole LLM as registered), else the registration order."""
    inner = ddp.module
    while not hasattr(inner, "parameters_in_forward_order") and hasattr(inner, "module"):
        inner = inner.module  # Float16Module
    order = getattr(inner, "parameters_in_forward_order", inner.parameters)()
    first: dict[torch.nn.Parameter, int] = {}
    for i, p in enumerate(order):
        first.setdefault(p, i)
    groups = ddp.bucket_groups + ddp.expert_parallel_bucket_groups
    return sorted(groups, key=lambda g: min(first.get(p, len(first)) for p in g.params))


class _InOrderGradReduce:
    """Issues the gradient reductions of one model chunk's buckets in one fixed order on every rank.

    megatron starts a bucket's reduce-scatter the moment its last gradient of the step arrives, so
    the order of the collectives is the order in which the backward completes the buckets. That is
    the same on every rank only if every rank runs the same backward; ours do not: on a text-only
    micro-batch the vision tower and projector get their (zero) gradients from one sum, all at once
    and in reverse registration order, on a micro-batch with images layer by layer in the order of
    the real backward. Buckets smaller than a vision layer then complete in different orders on
    different ranks (measured on the tiny model), and collectives issued in different orders hang or
    sum the wrong buckets. Here a bucket whose gradients are complete waits for the buckets before it
    in ``order`` (the reverse of the forward's order: the order a backward completes them), as torch's
    own DDP does. The first step (megatron issues every bucket at its end, in one order) and
    megatron's own calls outside the backward pass through."""

    def __init__(self, order: list):
        self.order = order
        self.start = {g: g.start_grad_sync for g in order}
        self.requested: dict = {}
        self.issued = 0
        for g in order:
            g.start_grad_sync = functools.partial(self._request, g)

    def _request(self, group, force_all_reduce: bool = False) -> None:
        if group.is_first_batch:
            return self.start[group](force_all_reduce=force_all_reduce)
        if self.issued == len(self.order):  # every bucket went out last step: this is a new one
            self.requested.clear()
            self.issued = 0
        self.requested[group] = force_all_reduce
        while self.issued < len(self.order) and self.order[self.issued] in self.requested:
            g = self.order[self.issued]
            self.issued += 1
            self.start[g](force_all_reduce=self.requested[g])


def _gathering(model: list[torch.nn.Module]) -> list[DistributedDataParallel]:
    return [m for m in model if getattr(getattr(m, "ddp_config", None), "overlap_param_gather", False)]


def _finish_param_gather(model: list[torch.nn.Module]) -> None:
    """Wait for every all-gather still in flight, also of buckets whose modules no forward of this rank
    ran (the vision tower on a text-only micro-batch): before gradients are reduced, before the
    optimizer writes the shards, before anyone reads the weights."""
    for m in _gathering(model):
        for group in m.bucket_groups + m.expert_parallel_bucket_groups:
            if group.param_gather_handle is not None:
                group.finish_param_sync(skip_next_bucket_dispatch=True)


@contextlib.contextmanager
def _overlapped_param_gather(model: list[torch.nn.Module]):
    """Issue every bucket's all-gather (all chunks, forward order), let the forward pre-hooks wait for
    them module by module, and end with none in flight."""
    chunks = _gathering(model)
    for m in chunks:
        for group in _gather_order(m):
            group.start_param_sync()
    for m in chunks:
        m.enable_forward_pre_hook()
    try:
        yield
    finally:
        for m in chunks:
            m.disable_forward_pre_hook(param_sync=False)
    _finish_param_gather(chunks)


def _finalize_model_grads(model: list[torch.nn.Module], *args, **kwargs):
    # megatron's finalize marks the all-gathers undispatched: finish them first (_finish_param_gather).
    _finish_param_gather(model)
    return finalize_model_grads(model, *args, **kwargs)


def _set_schedule_funcs(model: list[torch.nn.Module], optimizer, forward_only: bool) -> None:
    """What megatron's schedules call around the micro-batches, set as Megatron-LM's training loop
    sets them: with overlapped gradient reduction, ``no_sync`` for all micro-batches but the last and
    ``start_grad_sync`` (align_grad_reduce: stages other than the first, and the model chunks of an
    interleaved pipeline, reduce once their last backward is done)."""
    config = model[0].config
    config.finalize_model_grads_func = _finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss if not forward_only else None
    config.no_sync_func = config.grad_sync_func = None
    if all(getattr(getattr(m, "ddp_config", None), "overlap_grad_reduce", False) for m in model):
        no_sync, grad_sync = [m.no_sync for m in model], [m.start_grad_sync for m in model]
        config.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
        config.grad_sync_func = grad_sync[0] if len(model) == 1 else grad_sync


def build_optimizer(opt: OptimizerConfig, model: list[torch.nn.Module], *, params_dtype: torch.dtype,
                    use_distributed_optimizer: bool = False, lr: Optional[float] = None):
    bf16 = params_dtype == torch.bfloat16
    fp16 = params_dtype == torch.float16
    cfg = McoreOptimizerConfig(
        optimizer=opt.name, lr=opt.lr if lr is None else lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps, sgd_momentum=0.0,
        clip_grad=opt.clip_grad, bf16=bf16, fp16=fp16, params_dtype=params_dtype,
        use_distributed_optimizer=use_distributed_optimizer)
    optimizer = get_megatron_optimizer(cfg, model)
    if use_distributed_optimizer:
        # megatron falls back to torch's Adam without TE/apex, on GPUs too, and then resumes wrongly.
        from v2pe_megatron.runtime import torch_adam_checkpoint

        if torch_adam_checkpoint.needed(optimizer):
            torch_adam_checkpoint.activate()
    return optimizer


@dataclass
class StepResult:
    loss: float               # mean loss per trained token over the global batch
    num_tokens: int           # trained tokens in the global batch
    grad_norm: Optional[float]
    update_successful: bool   # False: non-finite loss or grad norm, the optimizer did not step


def train_step(model: list[DistributedDataParallel], optimizer, forward_step: Callable,
               data_iterator: Iterator[Any], *, num_microbatches: int, seq_length: int,
               micro_batch_size: int, layout: Optional[Layout] = None, forward_only: bool = False) -> StepResult:
    """Forward/backward over ``num_microbatches`` micro-batches, then one optimizer step.

    ``seq_length`` x ``micro_batch_size`` is the shape of a micro-batch as the loader makes it (the
    whole sequence, before any context-parallel split); ``layout`` turns it into the shape megatron's
    schedule sizes its stage-to-stage buffers with (``Layout.schedule_shape``; without a layout: sbhd).

    ``forward_step(data_iterator, model) -> (output, loss_func)`` where ``loss_func(output)`` returns
    ``(loss_sum, num_tokens, {"lm loss": tensor([loss_sum, num_tokens])})``: the 3-tuple form, so
    megatron neither divides by the micro-batch count nor multiplies by the CP size, and gradients
    are scaled by 1/(trained tokens in the global batch) in ``finalize_model_grads``.
    """
    if len(model) > 1 and not isinstance(data_iterator, list):
        # Interleaved pipeline: every model chunk reads each micro-batch (the first for tokens and
        # tiles, all for positions and packing, the last for labels), in its own order.
        batches = [next(data_iterator) for _ in range(num_microbatches)]
        data_iterator = [iter(batches) for _ in model]
    for m in model:
        m.zero_grad_buffer()
    if not forward_only:
        optimizer.zero_grad()
    _set_schedule_funcs(model, optimizer, forward_only)
    if layout is not None:
        seq_length, micro_batch_size = layout.schedule_shape(seq_length, micro_batch_size)
    fb = get_forward_backward_func()
    with _overlapped_param_gather(model):
        losses = fb(forward_step_func=forward_step, data_iterator=data_iterator, model=model,
                    num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
                    forward_only=forward_only)
    # Sum [loss_sum, tokens] over micro-batches (last stage) and data/context-parallel ranks; then
    # share it with the other pipeline stages so every rank reports the same number.
    totals = torch.zeros(2, dtype=torch.float64, device=device())
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for item in losses:
            totals += item["lm loss"].to(torch.float64).reshape(-1)[:2]
        torch.distributed.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
    loss_sum, tokens = totals.tolist()
    grad_norm, ok = None, True
    if not forward_only:
        ok, grad_norm = guarded_step(optimizer, loss_sum / max(tokens, 1.0))
    return StepResult(loss=loss_sum / max(tokens, 1.0), num_tokens=int(tokens),
                      grad_norm=float(grad_norm) if grad_norm is not None else None, update_successful=bool(ok))


def masked_loss_func(loss_mask: torch.Tensor):
    """The 3-tuple loss function over a per-token loss [b, s] and a float mask [b, s]."""

    def loss_func(per_token_loss: torch.Tensor):
        mask = loss_mask.to(per_token_loss.dtype)
        loss_sum = (per_token_loss.float() * mask).sum()
        num_tokens = mask.sum().to(torch.int)
        report = torch.stack([loss_sum.detach().clone(), num_tokens.to(loss_sum.dtype)])
        return loss_sum, num_tokens, {"lm loss": report}

    return loss_func
