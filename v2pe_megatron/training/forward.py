"""The forward step the pipeline schedules call: one packed micro-batch -> (output, loss function).

Per micro-batch: this CP rank's share of the pack (one zigzag index map for tokens, labels, loss
mask and V2PE positions; its tile share and the image-feature exchange plan), megatron's ``PackedSeqParams`` in the format the model's attention takes
(the layout's ``qkv_format``), and the masked per-token loss in megatron's 3-tuple form.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from megatron.core import parallel_state as ps

from v2pe_megatron.parallel.batch import MicroBatch
from v2pe_megatron.parallel.layout import Layout
from v2pe_megatron.parallel.packed_seq import split_batch_for_cp
from v2pe_megatron.training.checkpointing import unwrap
from v2pe_megatron.training.engine import masked_loss_func
from v2pe_megatron.training.loss import weighted_loss_func


def prepare_batch(batch: MicroBatch, layout: Layout, device: torch.device, dtype: torch.dtype,
                  img_context_id: Optional[int] = None) -> MicroBatch:
    """This rank's share of ``batch`` on ``device``, tiles in the model's ``dtype``. Under CP only the
    rank's tile share is moved (the loader yields just that share when built with the CP rank)."""
    thd = layout.qkv_format == "thd"
    share = split_batch_for_cp(batch, cp_size=layout.cp,
                               cp_rank=ps.get_context_parallel_rank() if layout.cp > 1 else 0,
                               qkv_format=layout.qkv_format, img_context_id=img_context_id,
                               # Transformer Engine reads cu_seqlens on the GPU; the local attention
                               # reads them on the host.
                               device=device if thd else None)
    return share.to(device, dtype)


def _prepared_once(batch: MicroBatch, inner, device: torch.device, dtype: torch.dtype) -> MicroBatch:
    """``prepare_batch`` of ``batch``; with an interleaved pipeline every model chunk of this rank
    reads the same micro-batch (``engine.train_step``), so the first prepares it (CP split, copies to
    the device) and the last one to read it drops the prepared copy."""
    chunks = inner.layout.virtual_pp
    if chunks <= 1:
        return prepare_batch(batch, inner.layout, device, dtype, inner.img_context_token_id)
    cache = vars(batch).setdefault("_prepared_for_chunks", [None, 0])
    if cache[0] is None:
        cache[0] = prepare_batch(batch, inner.layout, device, dtype, inner.img_context_token_id)
    cache[1] += 1
    out = cache[0]
    if cache[1] == chunks:
        del vars(batch)["_prepared_for_chunks"]
    return out


def vlm_forward_step(data_iterator: Iterator[MicroBatch], model):
    batch = next(data_iterator)
    inner = unwrap(model)  # DDP / Float16Module wrappers
    p = next(model.parameters())
    b = _prepared_once(batch, inner, p.device, p.dtype)
    out = model(b.tokens, b.position_ids, b.pixel_values, labels=b.labels, packed_seq_params=b.packed_seq_params,
                image_exchange=b.image_exchange, image_token_count=b.num_image_tokens)
    # Batches weighted by training.loss.step_batches (train.loss_reduction=square) carry their weights.
    if b.loss_weight is not None:
        return out, weighted_loss_func(b.loss_mask, b.loss_weight)
    return out, masked_loss_func(b.loss_mask)
