"""Core attention for the local spec: torch scaled-dot-product attention, device-agnostic.

A drop-in for megatron-core's ``core_attention`` slot (same forward signature as
``DotProductAttention``): query [s, b, np, hn], key/value [s, b, ng, hn] (GQA groups), output
[s, b, np * hn]. Unlike megatron's local ``DotProductAttention`` it understands packed sequences:
``packed_seq_params.cu_seqlens_q(_padded)`` (per batch row when given as a list) turns the mask
into per-sub-sample attention, so attention never crosses a sub-sample boundary.

Under context parallelism both classes call :func:`v2pe_megatron.model.ring_attention.ring_attention`;
``RingCoreAttention`` does so at CP=1 too.

The language model's layers apply V2PE's rotary embedding here too, in the same slot:
:func:`with_v2pe_rotary` makes any core attention (ours, Transformer Engine's) rotate query and key
with the micro-batch's cos/sin before attending (see :class:`V2PERotary`).
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
from v2pe_megatron.parallel.packed_seq import PackParams, host_cu_seqlens
from v2pe_megatron.v2pe import apply_rotary


def row_boundaries(packed_seq_params: Optional[PackedSeqParams], seq_len: int, batch: int
                   ) -> Optional[list[list[int]]]:
    """Per batch row, the (padded) sub-sample boundaries [0, ..., seq_len] (a tail past the last
    boundary is one more segment); None without packing. Computed once per micro-batch (memoized
    on a :class:`PackParams`) from host copies of the lengths, never read back per layer."""
    key = ("row_boundaries", seq_len, batch)
    memo = packed_seq_params.memo if isinstance(packed_seq_params, PackParams) else {}
    if key in memo:
        return memo[key]
    padded, _ = host_cu_seqlens(packed_seq_params, batch)
    out = None
    if padded is not None:
        out = []
        for r in padded:
            b = [x for x in r if 0 <= x <= seq_len]
            if not b or b[0] != 0:
                b.insert(0, 0)
            if b[-1] != seq_len:
                b.append(seq_len)
            out.append(b)
    memo[key] = out
    return out


class V2PERotary:
    """Mixin for a core-attention class: rotate query and key with the micro-batch's V2PE cos/sin
    (``PackParams.rotary``, computed once per micro-batch by the language model) before attending.

    Why here: megatron applies rotary between the qkv projection and the core attention, from
    frequencies it turns into cos/sin again for q and for k in every layer, and for packed ``thd``
    batches it reads the sub-sample lengths back from the device (``.tolist()``/``.item()`` per
    sub-sample, per layer: thousands of host syncs per step at 32K tokens). The core-attention slot
    sees the same q/k right after that point (megatron only squeezes thd's batch dim in between),
    so filling it keeps megatron's attention module unforked. The language model passes
    ``rotary_pos_emb=None`` to megatron's block, so nothing is rotated twice.
    """

    def forward(self, query, key, value, attention_mask, *args, packed_seq_params=None, **kwargs):
        rotary = getattr(packed_seq_params, "rotary", None)
        if rotary is not None:
            cos, sin = rotary                    # [s, b, 1, d]
            if query.dim() == 3:                 # thd: [t, heads, d], one flattened row
                cos, sin = cos[:, 0], sin[:, 0]
            query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        return super().forward(query, key, value, attention_mask, *args, packed_seq_params=packed_seq_params,
                               **kwargs)


_ROTARY_CLASSES: dict[type, type] = {}


def with_v2pe_rotary(core_attention: type) -> type:
    """``core_attention`` with :class:`V2PERotary` in front (one class per input class). The name
    and every class attribute stay the core attention's own (the layout checks read them)."""
    if issubclass(core_attention, V2PERotary):
        return core_attention
    if core_attention not in _ROTARY_CLASSES:
        _ROTARY_CLASSES[core_attention] = type(core_attention.__name__, (V2PERotary, core_attention),
                                               {"__module__": core_attention.__module__,
                                                "__qualname__": core_attention.__qualname__,
                                                "__doc__": core_attention.__doc__})
    return _ROTARY_CLASSES[core_attention]


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
        bounds_per_row = row_boundaries(packed_seq_params, s, b)
        dropout = self.dropout_p if self.training else 0.0
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if bounds_per_row is not None:
            # Packed rows: attend within each sub-sample separately. Same result as one block-diagonal
            # mask, but O(s) memory and the flash/efficient kernels (they take no explicit mask).
            rows = []
            for r, bounds in enumerate(bounds_per_row):
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
