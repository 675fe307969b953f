"""The local spec's core attention on packed rows equals a float64 block-diagonal reference, forward
and backward, with GQA, per-row sub-sample layouts and a padding tail."""

from __future__ import annotations

import pytest
import math

import torch

from v2pe_megatron.testing.distributed import run_distributed


def _reference(q, k, v, rows, causal):
    """float64 softmax attention with an explicit mask built from the sub-sample lengths."""
    s, b, h, d = q.shape
    g = k.shape[2]
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    k = k.repeat_interleave(h // g, dim=1)
    v = v.repeat_interleave(h // g, dim=1)
    seg = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])
    mask = seg[:, None, :, None] == seg[:, None, None, :]
    if causal:
        mask = mask & torch.ones(s, s, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (p @ v).permute(2, 0, 1, 3).reshape(s, b, h * d)


def _check() -> dict:
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from v2pe_megatron.model.attention import SDPACoreAttention
    from v2pe_megatron.runtime.distributed import model_parallel

    with model_parallel(1, 1):
        cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                                kv_channels=8, attention_dropout=0.0)
        attn = SDPACoreAttention(cfg, 1, AttnMaskType.causal)
        g = torch.Generator().manual_seed(0)
        s, b = 24, 2
        rows = [[5, 11, 6, 2], [24]]  # row 0: three sub-samples and a padding tail; row 1: one
        cu = [torch.tensor([0, *torch.tensor(r).cumsum(0).tolist()], dtype=torch.int32) for r in rows]
        psp = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
        errs = {}
        for causal in (True, False):
            q = torch.randn(s, b, 4, 8, generator=g, requires_grad=True)
            k = torch.randn(s, b, 2, 8, generator=g, requires_grad=True)
            v = torch.randn(s, b, 2, 8, generator=g, requires_grad=True)
            mt = AttnMaskType.causal if causal else AttnMaskType.no_mask
            out = attn(q, k, v, None, attn_mask_type=mt, packed_seq_params=psp)
            ref = _reference(q, k, v, rows, causal)
            w = torch.randn(out.shape, generator=g)
            grads = torch.autograd.grad((out * w).sum(), (q, k, v))
            ref_grads = torch.autograd.grad((ref * w.double()).sum(), (q, k, v))
            errs[causal] = max([(out.double() - ref).abs().max().item()] +
                               [(a.double() - r.double()).abs().max().item() for a, r in zip(grads, ref_grads)])
        return errs


@pytest.mark.slow
def test_packed_attention_matches_block_diagonal_reference():
    errs = run_distributed(_check, 1)[0]
    assert errs[True] < 1e-5 and errs[False] < 1e-5, errs
