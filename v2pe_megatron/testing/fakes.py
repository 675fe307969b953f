"""Stand-ins for distributed objects and for Transformer Engine in tests."""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from v2pe_megatron.model.attention import SDPACoreAttention
from v2pe_megatron.model.ring_attention import ring_attention


class FakeGroup:
    """What megatron's unfused THD rotary path reads from a CP group: ``size()`` and ``rank()``."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


class TEDotProductAttention(SDPACoreAttention):
    """Stand-in for megatron's Transformer Engine attention that checks TE's packed (``thd``) contract
    and computes with our ring attention, so the TE path of the model (thd batches, megatron's THD
    rotary, flattened pipeline buffers) runs on a machine without TE.

    Named like megatron's class on purpose: it is what a TE layer spec puts in the core-attention
    slot. What it asserts is what Transformer Engine's ``DotProductAttention`` requires of a thd
    call: 3-D q/k/v [t, heads, dim]; int32 1-D ``cu_seqlens`` on q's device; padded ``cu_seqlens``
    when cp > 1, whose total is the whole pack (``q.shape[0] * cp == cu_seqlens_q_padded[-1]``);
    integer ``max_seqlen``; and, as megatron's wrapper converts it for thd, a ``padding_causal`` mask.
    """

    calls = 0  # thd calls that met the contract (tests check that the path ran at all)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_unused):
        return _te_thd_forward(self, query, key, value, attn_mask_type, packed_seq_params)


def _te_thd_forward(self, query, key, value, attn_mask_type, packed_seq_params):
    p = packed_seq_params
    assert p is not None and p.qkv_format == "thd", "the TE spec must feed packed batches as thd"
    mask = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
    if mask == AttnMaskType.causal:  # megatron's TE wrapper does this for thd (TE needs a padding mask)
        mask = AttnMaskType.padding_causal
    assert mask == AttnMaskType.padding_causal, f"thd attention needs padding_causal, got {mask}"
    for name, t in (("query", query), ("key", key), ("value", value)):
        assert t.dim() == 3, f"thd {name} must be [t, heads, dim], got {tuple(t.shape)}"
    cp = self.cp_size
    for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        cu = getattr(p, name)
        if cu is None:
            assert not (cp > 1 and name.endswith("_padded")), f"{name} is required when cp > 1"
            continue
        assert torch.is_tensor(cu) and cu.dim() == 1, f"{name} must be one 1-D tensor in thd"
        assert cu.dtype == torch.int32, f"{name} must be int32, got {cu.dtype}"
        assert cu.device == query.device, f"{name} is on {cu.device}, q on {query.device}"
    padded = p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q
    assert query.shape[0] * cp == int(padded[-1]), \
        f"q holds {query.shape[0]} tokens x cp {cp} but cu_seqlens end at {int(padded[-1])}"
    for name in ("max_seqlen_q", "max_seqlen_kv"):
        assert isinstance(getattr(p, name), int), f"{name} must be a Python int"
    TEDotProductAttention.calls += 1
    sbhd = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=p.cu_seqlens_q, cu_seqlens_kv=p.cu_seqlens_kv,
                           cu_seqlens_q_padded=p.cu_seqlens_q_padded, cu_seqlens_kv_padded=p.cu_seqlens_kv_padded,
                           max_seqlen_q=p.max_seqlen_q, max_seqlen_kv=p.max_seqlen_kv)
    out = ring_attention(query[:, None], key[:, None], value[:, None], causal=True, softmax_scale=self.softmax_scale,
                         packed_seq_params=sbhd, cp_group=self.pg_collection.cp if cp > 1 else None)
    return out[:, 0]  # [t, heads * dim], as TE returns in thd
