"""One optimizer step through megatron-core's machinery: DDP wrapper, (distributed) optimizer and the
pipeline schedules. The training loop, the tests' parity runs and the demo all step through here, so
that what the tests prove is what training does.
"""

from __future__ import annotations

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
from v2pe_megatron.parallel.layout import Layout
from v2pe_megatron.runtime.distributed import device
from v2pe_megatron.training.nonfinite import guarded_step


def wrap_ddp(model: torch.nn.Module, config: TransformerConfig, *, use_distributed_optimizer: bool = False,
             disable_bucketing: bool = False) -> DistributedDataParallel:
    """megatron DDP with fp32 gradient buffers; per-token loss scaling is done in finalize_model_grads.
    ``disable_bucketing``: for every model chunk but the first of an interleaved pipeline (as megatron
    does: their gradients are reduced together at the end of the step)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False, average_in_collective=False)
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model,
                                   disable_bucketing=disable_bucketing)


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
    config = model[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss if not forward_only else None
    if layout is not None:
        seq_length, micro_batch_size = layout.schedule_shape(seq_length, micro_batch_size)
    fb = get_forward_backward_func()
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
