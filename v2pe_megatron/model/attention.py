"""Core attention for the local spec: torch scaled-dot-product attention, device-agnostic.

A drop-in for megatron-core's ``core_attention`` slot (same forward signature as
``DotProductAttention``): query [s, b, np, hn], key/value [s, b, ng, hn] (GQA groups), output
[s, b, np * hn]. Unlike megatron's local ``DotProductAttention`` it understands packed sequences:
``packed_seq_params.cu_seqlens_q(_padded)`` (per batch row when given as a list) turns the mask
into per-sub-sample attention, so attention never crosses a sub-sample boundary.

Under context parallelism both classes call :func:`v2pe_megatron.model.ring_attention.ring_attention`;
``RingCoreAttention`` does so at CP=1 too.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor

from v2pe_megatron.model.ring_attention import ring_attention
from v2pe_megatron.parallel.layout import LayoutError, cp_comm_type_problem


def row_boundaries(cu_seqlens: Tensor | list[Tensor], seq_len: int, batch: int) -> list[list[int]]:
    """Per batch row, the sub-sample boundaries [0, ..., seq_len] (a tail past the last boundary is
    one more segment)."""
    rows = cu_seqlens if isinstance(cu_seqlens, (list, tuple)) else [cu_seqlens] * batch
    if len(rows) != batch:
        raise ValueError(f"got cu_seqlens for {len(rows)} rows but the batch has {batch}")
    out = []
    for r in rows:
        b = [int(x) for x in r.tolist() if 0 <= int(x) <= seq_len]
        if not b or b[0] != 0:
            b.insert(0, 0)
        if b[-1] != seq_len:
            b.append(seq_len)
        out.append(b)
    return out


def cu_seqlens_of(packed_seq_params: Optional[PackedSeqParams]):
    """The (padded, if present) cumulative lengths of a pack, or None."""
    if packed_seq_params is None:
        return None
    if packed_seq_params.cu_seqlens_q_padded is not None:
        return packed_seq_params.cu_seqlens_q_padded
    return packed_seq_params.cu_seqlens_q


class SDPACoreAttention(MegatronModule):
    # Context parallelism: p2p ring attention (v2pe_megatron.model.ring_attention).
    supports_context_parallel = True

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.attn_mask_type = attn_mask_type
        tp = pg_collection.tp.size()
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups or config.num_attention_heads, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # The CP group exists for every module once megatron's state is up; only modules whose config
        # asks for CP split their sequence (the vision tower keeps context_parallel_size=1).
        self.cp_size = (pg_collection.cp.size() if config.context_parallel_size > 1
                        and getattr(pg_collection, "cp", None) is not None else 1)
        problem = cp_comm_type_problem(cp_comm_type or "p2p", "local", self.cp_size)
        if problem:
            raise LayoutError(problem)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None, **_unused) -> Tensor:
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by SDPACoreAttention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        s, b = query.shape[0], query.shape[1]
        if self.cp_size > 1:
            return ring_attention(query, key, value, causal=causal, softmax_scale=self.softmax_scale,
                                  packed_seq_params=packed_seq_params, cp_group=self.pg_collection.cp)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.groups_per_partition != self.heads_per_partition:
            rep = self.heads_per_partition // self.groups_per_partition
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        cu = cu_seqlens_of(packed_seq_params)
        dropout = self.dropout_p if self.training else 0.0
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if cu is not None:
            # Packed rows: attend within each sub-sample separately. Same result as one block-diagonal
            # mask, but O(s) memory and the flash/efficient kernels (they take no explicit mask).
            rows = []
            for r, bounds in enumerate(row_boundaries(cu, s, b)):
                parts = [sdpa(q[r:r + 1, :, a:e], k[r:r + 1, :, a:e], v[r:r + 1, :, a:e], dropout_p=dropout,
                              is_causal=causal, scale=self.softmax_scale)
                         for a, e in zip(bounds[:-1], bounds[1:]) if e > a]
                rows.append(torch.cat(parts, dim=2))
            out = torch.cat(rows, dim=0)
        else:
            mask = None
            if attention_mask is not None:
                mask = ~attention_mask.bool()  # megatron's convention: True = masked out
                if causal:
                    mask = mask & torch.ones(s, s, dtype=torch.bool, device=query.device).tril()
            out = sdpa(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None,
                       scale=self.softmax_scale)
        # [b, h, s, d] -> [s, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(s, b, self.heads_per_partition * self.head_dim)


class RingCoreAttention(SDPACoreAttention):
    """The local spec's core attention, but blockwise (ring) at every CP size, CP=1 included.

    ``SDPACoreAttention`` at CP=1 calls torch SDPA per sub-sample, whose CPU (math) kernel holds each
    sub-sample's [L, L] scores; this one keeps O(s) (saved q/k/v/out/lse plus one score tile), which
    is what long packs on a machine without flash attention need, and what makes CP=1 a fair
    baseline in ``benchmarks/cp_memory.py``.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None, **_unused) -> Tensor:
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by RingCoreAttention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if attention_mask is not None and packed_seq_params is None:
            raise NotImplementedError("RingCoreAttention takes packed_seq_params, not an attention mask")
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        group = self.pg_collection.cp if self.cp_size > 1 else None
        return ring_attention(query, key, value, causal=causal, softmax_scale=self.softmax_scale,
                              packed_seq_params=packed_seq_params, cp_group=group)
