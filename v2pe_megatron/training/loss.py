"""Loss reductions over the global batch: ``token`` and InternVL's ``square``.

``token``: every trained token weighs 1, the loss is the mean over the global batch's trained tokens.

``square`` (InternVL / V2PE ``loss_reduction == 'square'``, ``len2weight(n) = 1 / n ** 0.5``): every
trained token of a sub-sample with n trained tokens weighs ``w = 1 / sqrt(n)``, so a sub-sample
contributes ``sqrt(n) * mean(its token losses)``; the loss is ``sum(w * l) / sum(w)`` with both sums
over the whole global batch (all micro-batches, all data-parallel ranks). InternVL's
``modeling_internvl_chat`` divides each micro-batch's ``sum(w * l)`` by the data-parallel mean of
that micro-batch's ``sum(w)`` (``all_reduce(AVG)``) and DDP averages the gradients, which is the same
number when every rank runs one micro-batch per step; with gradient accumulation we normalise by the
step's global ``sum(w)``, as ``token`` normalises by the step's global token count.

How it stays exact under packing, context and data parallelism:

- sub-samples are a row's ``MicroBatch.seq_lens`` segments and n counts ``loss_mask`` inside each
  (the mask already sits on the shifted labels, so n is InternVL's count of ``labels != -100``);
- the weights are computed per token on the whole pack, before the CP split, and travel as
  ``MicroBatch.loss_weight``, sliced with the tokens by ``split_batch_for_cp``;
- megatron's schedules sum the loss function's token counts in an int tensor (``total_num_tokens``,
  ``pipeline_parallel/schedules.py``) and ``finalize_model_grads`` scales gradients by 1 / their
  all-reduced sum, so a float weight sum cannot be returned there. Instead the step's micro-batches
  are drawn before the step, the global ``N = sum(mask)`` and ``W = sum(w)`` all-reduced over the
  data-parallel group, and each token's weight scaled to ``w * N / W``: megatron's division by N
  then yields ``sum(w * l) / W`` exactly, and the reported loss (loss sum / tokens) is the same.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from v2pe_megatron.parallel.batch import MicroBatch

REDUCTIONS = ("token", "square")


def subsample_weights(loss_mask: torch.Tensor, seq_lens, reduction: str = "square") -> torch.Tensor:
    """float64 [B, S] per-token weights (0 where ``loss_mask`` is 0) for a pack's rows."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss reduction {reduction!r} is not one of {REDUCTIONS}")
    mask = loss_mask.to(torch.float64)
    if reduction == "token":
        return mask.clone()
    rows = [seq_lens] if isinstance(seq_lens, torch.Tensor) and seq_lens.dim() == 1 else seq_lens
    out = torch.zeros_like(mask)
    for i, lens in enumerate(rows):
        lens = [int(x) for x in (lens.tolist() if hasattr(lens, "tolist") else lens)]
        if sum(lens) != mask.shape[1]:
            raise ValueError(f"row {i}: seq_lens {lens} do not cover the row's {mask.shape[1]} tokens")
        bounds = torch.tensor([0] + lens).cumsum(0)
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            seg = mask[i, a:b]
            n = float(seg.sum())
            if n > 0:
                out[i, a:b] = seg / n ** 0.5
    return out


def weighted_loss_func(loss_mask: torch.Tensor, loss_weight: torch.Tensor):
    """The 3-tuple loss function with per-token weights already scaled to ``w * N / W``: returns
    ``(sum(weight * mask * loss), mask tokens, report)`` (see the module docstring)."""

    def loss_func(per_token_loss: torch.Tensor):
        mask = loss_mask.to(per_token_loss.dtype)
        weight = loss_weight.to(torch.float32) * mask.float()
        loss_sum = (per_token_loss.float() * weight).sum()
        num_tokens = mask.sum().to(torch.int)
        report = torch.stack([loss_sum.detach().clone(), num_tokens.to(loss_sum.dtype)])
        return loss_sum, num_tokens, {"lm loss": report}

    return loss_func


def step_batches(it: Iterator[MicroBatch], num_microbatches: int, reduction: str, *,
                 group: Optional[torch.distributed.ProcessGroup] = None,
                 device: Optional[torch.device] = None) -> Iterator[MicroBatch]:
    """The iterator one training step draws its ``num_microbatches`` micro-batches from.

    ``token``: ``it`` itself (nothing drawn ahead). ``square``: the step's micro-batches are drawn
    now, weighted, and the global ``N / W`` all-reduced over ``group`` (the data-parallel group
    without CP: the CP ranks of one replica hold the same whole packs); every rank calls this.
    """
    if reduction == "token":
        return it
    batches = [next(it) for _ in range(num_microbatches)]
    weights = [subsample_weights(b.loss_mask, b.seq_lens, reduction) for b in batches]
    sums = torch.tensor([float(sum(b.loss_mask.double().sum() for b in batches)),
                         float(sum(w.sum() for w in weights))], dtype=torch.float64, device=device)
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(sums, group=group)
    n, w = sums.tolist()
    scale = n / w if w > 0 else 0.0
    return iter([b.replace(loss_weight=(wt * scale).to(torch.float32)) for b, wt in zip(batches, weights)])
