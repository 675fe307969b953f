"""Ring attention (context parallelism without Transformer Engine) against full attention.

Reference: plain float64 attention over the whole pack with an explicit mask (same sub-sample, key
not padding, causal by position), written independently of the ring's chunk-pair bookkeeping. Each
CP rank runs the ring on its zigzag slice; its outputs and its dq/dk/dv must equal the reference's
rows picked with the same index map.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from v2pe_megatron.parallel.cp_split import zigzag_index_map
from v2pe_megatron.testing.distributed import run_distributed

HEADS, GROUPS, DIM = 4, 2, 8


def _cu(lens) -> torch.Tensor:
    return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)


def reference_attention(q, k, v, padded_rows, real_rows, causal: bool, scale: float) -> torch.Tensor:
    """q [S, b, np, d], k/v [S, b, ng, d] (whole pack) -> [S, b, np*d], in float64."""
    S, b, nh, d = q.shape
    rep = nh // k.shape[2]
    outs = []
    for row in range(b):
        seg = torch.repeat_interleave(torch.arange(len(padded_rows[row])), torch.tensor(padded_rows[row]))
        starts = torch.tensor(np.concatenate([[0], np.cumsum(padded_rows[row])[:-1]]))
        pos = torch.arange(S) - starts[seg]
        valid_key = pos < torch.tensor(real_rows[row])[seg]
        mask = (seg[:, None] == seg[None, :]) & valid_key[None, :]
        if causal:
            mask &= pos[None, :] <= pos[:, None]
        qq = q[:, row].double().permute(1, 0, 2)
        kk = k[:, row].double().repeat_interleave(rep, dim=1).permute(1, 0, 2)
        vv = v[:, row].double().repeat_interleave(rep, dim=1).permute(1, 0, 2)
        s = (qq @ kk.transpose(-1, -2)) * scale
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a query without keys -> zero output
        outs.append((p @ vv).permute(1, 0, 2).reshape(S, nh * d))
    return torch.stack(outs, dim=1)


def _case(seed: int, padded_rows, real_rows, batch: int):
    S = sum(padded_rows[0])
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, batch, HEADS, DIM, generator=g)
    k = torch.randn(S, batch, GROUPS, DIM, generator=g)
    v = torch.randn(S, batch, GROUPS, DIM, generator=g)
    dout = torch.randn(S, batch, HEADS * DIM, generator=g)
    return q, k, v, dout


def _packed(padded_rows, real_rows) -> PackedSeqParams:
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=[_cu(r) for r in real_rows],
                           cu_seqlens_kv=[_cu(r) for r in real_rows],
                           cu_seqlens_q_padded=[_cu(r) for r in padded_rows],
                           cu_seqlens_kv_padded=[_cu(r) for r in padded_rows])


def _check_ring(cp: int, padded_rows, real_rows, causal: bool, tile_elems: int | None = None) -> dict:
    """Runs on every rank of a cp-sized world (or in-process with cp == 1)."""
    import v2pe_megatron.model.ring_attention as ra

    if tile_elems is not None:
        ra._TILE_ELEMS = tile_elems
    group = torch.distributed.group.WORLD if cp > 1 else None
    rank = torch.distributed.get_rank() if cp > 1 else 0
    batch = len(padded_rows)
    scale = DIM ** -0.5
    q, k, v, dout = _case(11, padded_rows, real_rows, batch)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, padded_rows, real_rows, causal, scale)
    ref.backward(dout.double())
    errs: dict[str, float] = {}
    # Rows of one micro-batch share the local length but may have different sub-sample layouts.
    maps = [torch.from_numpy(zigzag_index_map(r, cp, rank)) for r in padded_rows]

    def local(t: torch.Tensor) -> torch.Tensor:
        return torch.stack([t[m, i] for i, m in enumerate(maps)], dim=1)

    lq, lk, lv = (local(t).clone().requires_grad_() for t in (q, k, v))
    sent: list[int] = []
    real_isend = ra.dist.isend

    def isend(tensor, *args, **kwargs):  # the ring only ever ships one rank's K/V (or their grads)
        sent.append(tensor.numel())
        return real_isend(tensor, *args, **kwargs)

    ra.dist.isend = isend
    try:
        out = ra.ring_attention(lq, lk, lv, causal=causal, softmax_scale=scale,
                                packed_seq_params=_packed(padded_rows, real_rows), cp_group=group)
        out.backward(local(dout))
    finally:
        ra.dist.isend = real_isend
    if cp > 1:
        assert len(sent) == (cp - 1) + (cp - 1) + cp  # K/V forward, K/V backward, dK/dV home
        assert max(sent) == 2 * lk.numel()
    errs["out"] = (out.double() - local(ref.detach())).abs().max().item()
    for name, mine, theirs in (("dq", lq, ref_in[0]), ("dk", lk, ref_in[1]), ("dv", lv, ref_in[2])):
        errs[name] = (mine.grad.double() - local(theirs.grad)).abs().max().item()
    errs["ref_scale"] = ref.abs().max().item()
    return errs


# Unequal sub-samples, some with padding (real < padded), one all-padding, a tail segment.
ROWS_CP4 = ([24, 8, 40, 16, 8], [16, 48, 8, 24, 0])  # each a multiple of 2*4, each row sums to 96
REAL_CP4 = ([21, 8, 33, 16, 0], [16, 45, 3, 24, 0])


@pytest.mark.parametrize("causal", [True, False])
def test_blockwise_single_rank_matches_full_attention(causal):
    # Tiny tiles force many query tiles and the masked/unmasked tile boundaries inside a chunk pair.
    errs = _check_ring(1, ROWS_CP4, REAL_CP4, causal, tile_elems=64)
    assert max(errs[k] for k in ("out", "dq", "dk", "dv")) < 1e-5, errs


def _ring_world(cases) -> list[dict]:
    cp = torch.distributed.get_world_size()
    torch.set_num_threads(1)
    return [_check_ring(cp, *c) for c in cases]


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_matches_full_attention(cp):
    cases = [(ROWS_CP4, REAL_CP4, True, None), (ROWS_CP4, REAL_CP4, False, None),
             ([[96], [40, 56]], [[96], [40, 50]], True, 256)]  # one sequence (megatron's plain CP) + tiling
    results = run_distributed(_ring_world, cp, cases, timeout=180)
    for rank, per_case in enumerate(results):
        for case, errs in zip(cases, per_case):
            assert max(errs[k] for k in ("out", "dq", "dk", "dv")) < 1e-5, (rank, case[2], errs)
