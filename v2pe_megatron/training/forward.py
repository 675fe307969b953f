"""The forward step the pipeline schedules call: one packed micro-batch -> (output, loss function).

Per micro-batch: this CP rank's share of the pack (one zigzag index map for tokens, labels, loss
mask and V2PE positions), megatron's ``PackedSeqParams`` so attention stays inside sub-samples, and
the masked per-token loss in megatron's 3-tuple form.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from megatron.core import parallel_state as ps

from v2pe_megatron.model.specs import packed_qkv_format
from v2pe_megatron.packed_seq import packed_seq_params, split_batch_for_cp
from v2pe_megatron.training.engine import masked_loss_func


def prepare_batch(batch: dict[str, Any], device: torch.device, dtype: torch.dtype,
                  img_context_id: int | None = None, qkv_format: str = "sbhd") -> dict[str, Any]:
    cp = ps.get_context_parallel_world_size()
    if cp > 1 or qkv_format == "thd":
        # image_feature_index: which of the pack's image features this rank's <IMG_CONTEXT> tokens take
        batch = split_batch_for_cp(batch, cp_size=cp, cp_rank=ps.get_context_parallel_rank(),
                                   qkv_format=qkv_format, img_context_id=img_context_id if cp > 1 else None)
        if qkv_format == "thd":  # Transformer Engine reads cu_seqlens on the GPU
            batch["packed_seq_params"] = packed_seq_params(batch["seq_lens"], qkv_format="thd", cp_size=cp,
                                                           device=device)
    else:
        batch = dict(batch)
        batch["packed_seq_params"] = packed_seq_params(batch["seq_lens"], device=batch["tokens"].device)
    out = dict(batch)
    for k in ("tokens", "labels", "loss_mask", "position_ids"):
        out[k] = batch[k].to(device)
    index = batch.get("image_feature_index")
    out["image_feature_index"] = index.to(device) if index is not None else None
    pv = batch.get("pixel_values")
    out["pixel_values"] = pv.to(device=device, dtype=dtype) if pv is not None and pv.numel() else None
    return out


def vlm_forward_step(data_iterator: Iterator[dict[str, Any]], model):
    batch = next(data_iterator)
    p = next(model.parameters())
    inner = model
    while hasattr(inner, "module"):  # DDP / Float16Module wrappers
        inner = inner.module
    if not hasattr(inner, "_packed_qkv_format"):
        inner._packed_qkv_format = packed_qkv_format(inner)  # thd for TE attention, sbhd for the local spec
    b = prepare_batch(batch, p.device, p.dtype, getattr(inner, "img_context_token_id", None),
                      inner._packed_qkv_format)
    out = model(b["tokens"], b["position_ids"], b["pixel_values"], labels=b["labels"],
                packed_seq_params=b["packed_seq_params"], image_feature_index=b["image_feature_index"])
    return out, masked_loss_func(b["loss_mask"])
