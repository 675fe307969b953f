"""Core attention for the local spec: torch scaled-dot-product attention, device-agnostic.

A drop-in for megatron-core's ``core_attention`` slot (same forward signature as
``DotProductAttention``): query [s, b, np, hn], key/value [s, b, ng, hn] (GQA groups), output
[s, b, np * hn]. Unlike megatron's local ``DotProductAttention`` it understands packed sequences:
``packed_seq_params.cu_seqlens_q(_padded)`` (per batch row when given as a list) turns the mask
into a block-diagonal one, so attention never crosses a sub-sample boundary.
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


def segment_ids_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """[0, 3, 5] with total 6 -> [0, 0, 0, 1, 1, 2] (tokens past the last boundary form one more segment)."""
    pos = torch.arange(total, device=cu_seqlens.device)
    return torch.bucketize(pos, cu_seqlens[1:].to(pos.dtype), right=True)


def packed_mask(cu_seqlens: Tensor | list[Tensor], seq_len: int, batch: int, causal: bool,
                device: torch.device) -> Optional[Tensor]:
    """Boolean [b, 1, s, s] mask (True = attend) for packed rows; None when not packed and not causal."""
    rows = cu_seqlens if isinstance(cu_seqlens, (list, tuple)) else [cu_seqlens] * batch
    if len(rows) != batch:
        raise ValueError(f"got cu_seqlens for {len(rows)} rows but the batch has {batch}")
    seg = torch.stack([segment_ids_from_cu_seqlens(r.to(device), seq_len) for r in rows])  # [b, s]
    mask = seg[:, :, None] == seg[:, None, :]
    if causal:
        mask &= torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    return mask[:, None]


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
        if self.cp_size > 1 and cp_comm_type not in (None, "p2p"):
            raise ValueError(f"parallel.cp_comm_type={cp_comm_type!r} needs Transformer Engine (model.spec=te); the "
                             f"local spec's ring attention exchanges K/V point to point: use cp_comm_type=p2p")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None, **_unused) -> Tensor:
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by SDPACoreAttention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        s, b = query.shape[0], query.shape[1]
        if self.cp_size > 1:
            from v2pe_megatron.model.ring_attention import ring_attention  # CP path (ring over the cp group)

            return ring_attention(query, key, value, causal=causal, softmax_scale=self.softmax_scale,
                                  packed_seq_params=packed_seq_params, cp_group=self.pg_collection.cp)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.groups_per_partition != self.heads_per_partition:
            rep = self.heads_per_partition // self.groups_per_partition
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        cu = cu_seqlens_of(packed_seq_params)
        mask = None
        if cu is not None:
            mask = packed_mask(cu, s, b, causal, query.device)
        elif attention_mask is not None:
            # megatron's convention: True = masked out
            mask = ~attention_mask.bool()
            if causal:
                mask = mask & torch.ones(s, s, dtype=torch.bool, device=query.device).tril()
        dropout = self.dropout_p if self.training else 0.0
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None,
            scale=self.softmax_scale)
        # [b, h, s, d] -> [s, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(s, b, self.heads_per_partition * self.head_dim)
