"""Ring attention over the context-parallel group, for packed sequences, without Transformer Engine.

Layout (megatron's and Transformer Engine's THD convention, :mod:`v2pe_megatron.parallel.cp_split`): every
sub-sample of a row, padded length ``L`` (a multiple of 2*cp), is cut into 2*cp chunks of
``c = L / (2 cp)`` tokens and rank ``r`` holds chunks ``r`` and ``2cp-1-r``, sub-sample after
sub-sample. ``cu_seqlens`` in :class:`PackedSeqParams` describe the *whole* pack (global offsets),
as megatron's THD rotary and TE expect; each rank derives its local layout from them.

Algorithm: the K/V of every rank travel once around the ring (rank r sends to r+1, receives from
r-1), so a rank never holds more than its own and one visiting K/V block. For each visiting block
the chunk pairs of each sub-sample are classified exactly: with query chunk ``qc`` and key chunk
``kc`` of the same sub-sample, ``kc < qc`` is full attention, ``kc == qc`` causal, ``kc > qc``
nothing; different sub-samples never meet. Partial results are merged by log-sum-exp. Work per
rank is balanced: at ring step > 0 every rank computes exactly two chunk pairs per sub-sample.

The backward is a second ring pass that recomputes the probabilities from the saved log-sum-exp
(flash-attention style, so memory stays O(local tokens)); the dK/dV accumulators travel with the
visiting K/V blocks and arrive back at their owner after the last step. Everything is computed in
float32 and tiled over query rows so that no score matrix is larger than ``_TILE_ELEMS``.

Padding: keys past a sub-sample's unpadded length (``cu_seqlens_q`` vs ``cu_seqlens_q_padded``) are
masked, like Transformer Engine does; a query with no key at all (an all-padding sub-sample) gets
a zero output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from v2pe_megatron.parallel.packed_seq import PackParams, host_cu_seqlens

__all__ = ["ring_attention", "RowLayout", "Segment", "row_layouts"]

# Upper bound on elements of one score tile (heads x query rows x keys): 2^21 floats = 8 MiB.
_TILE_ELEMS = 1 << 21
_KV_TAG, _GRAD_TAG = 17, 18


@dataclass(frozen=True)
class Segment:
    """One sub-sample of one row as laid out on every CP rank."""

    local_start: int  # offset of its first local token in the rank's row (same on every rank)
    chunk: int        # c = padded length / (2 cp)
    valid: int        # unpadded length: keys at sub-sample positions >= valid are masked


@dataclass(frozen=True)
class RowLayout:
    segments: tuple[Segment, ...]
    local_len: int


def row_layouts(packed_seq_params: Optional[PackedSeqParams], batch: int, local_len: int,
                cp_size: int) -> list[RowLayout]:
    """Per-row local layouts from the pack's global cu_seqlens (one set for all rows, or one per row).

    Without packing (no ``packed_seq_params``, or one that carries no lengths): each row is one
    sequence of ``local_len * cp_size`` tokens. Computed once per micro-batch: a
    :class:`~v2pe_megatron.parallel.packed_seq.PackParams` carries the lengths as Python ints and
    keeps the result for the other layers.
    """
    p = packed_seq_params
    memo = p.memo if isinstance(p, PackParams) else {}
    key = ("row_layouts", batch, local_len, cp_size)
    if key not in memo:
        memo[key] = _row_layouts(p, batch, local_len, cp_size)
    return memo[key]


def _row_layouts(p: Optional[PackedSeqParams], batch: int, local_len: int, cp_size: int) -> list[RowLayout]:
    total = local_len * cp_size
    padded_rows, real_rows = host_cu_seqlens(p, batch)
    if padded_rows is None:
        padded_rows, real_rows = [[0, total]] * batch, None
    elif not isinstance(p, PackParams):  # PackParams hold one set of lengths for q and kv by construction
        kv = p.cu_seqlens_kv_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_kv
        if kv is not None:
            kv_rows = host_cu_seqlens(dataclasses.replace(p, cu_seqlens_q=kv, cu_seqlens_q_padded=None), batch)[0]
            if kv_rows != padded_rows:
                raise ValueError("ring attention is self-attention: the key cu_seqlens must equal the query ones")
    real_rows = real_rows if real_rows is not None else [None] * batch
    layouts = []
    for row, (pc, rc) in enumerate(zip(padded_rows, real_rows)):
        if pc[0] != 0:
            raise ValueError(f"row {row}: cu_seqlens must start at 0, got {pc[:3]}")
        if pc[-1] < total:  # tokens past the last boundary form one more sub-sample
            pc = pc + [total]
            rc = rc + [rc[-1]] if rc is not None else None
        if pc[-1] != total:
            raise ValueError(f"row {row}: cu_seqlens end at {pc[-1]} but the row holds {local_len} tokens "
                             f"per rank x cp {cp_size} = {total}; cu_seqlens must describe the whole pack")
        if rc is not None and len(rc) != len(pc):
            raise ValueError(f"row {row}: cu_seqlens_q and cu_seqlens_q_padded have different lengths")
        segs, off = [], 0
        for i in range(len(pc) - 1):
            n = pc[i + 1] - pc[i]
            if n % (2 * cp_size):
                raise ValueError(f"row {row}, sub-sample {i}: padded length {n} is not a multiple of 2*cp = "
                                 f"{2 * cp_size}; pad every sub-sample to a multiple of {2 * cp_size}")
            valid = n if rc is None else rc[i + 1] - rc[i]
            if not 0 <= valid <= n:
                raise ValueError(f"row {row}, sub-sample {i}: unpadded length {valid} not in [0, {n}]")
            if n:
                segs.append(Segment(off, n // (2 * cp_size), valid))
            off += n // cp_size
        layouts.append(RowLayout(tuple(segs), local_len))
    return layouts


@dataclass(frozen=True)
class _Op:
    """Queries [qs, qs+qn) at sub-sample positions qp.. against keys [ks, ks+kn) at positions kp..
    (local offsets into the query rank's and key rank's rows); causal: key pos <= query pos."""

    qs: int
    qn: int
    qp: int
    ks: int
    kn: int
    kp: int
    causal: bool


def _ops(layout: RowLayout, q_rank: int, kv_rank: int, cp: int, causal: bool) -> list[_Op]:
    ops = []
    for seg in layout.segments:
        c = seg.chunk
        q_chunks = ((seg.local_start, q_rank), (seg.local_start + c, 2 * cp - 1 - q_rank))
        k_chunks = ((seg.local_start, kv_rank), (seg.local_start + c, 2 * cp - 1 - kv_rank))
        for qs, qc in q_chunks:
            for ks, kc in k_chunks:
                if causal and kc > qc:
                    continue
                kn = min(c, seg.valid - kc * c)  # padding keys sit at the end of the sub-sample
                if kn <= 0:
                    continue
                ops.append(_Op(qs, c, qc * c, ks, kn, kc * c, causal and kc == qc))
    return ops


def _tiles(op: _Op, heads: int, device: torch.device):
    """(q row range, number of keys, mask or None) per tile of an op."""
    rows = max(1, min(op.qn, _TILE_ELEMS // max(1, heads * op.kn)))
    for a in range(0, op.qn, rows):
        b = min(op.qn, a + rows)
        kn = op.kn
        mask = None
        if op.causal:
            kn = min(kn, op.qp + b - op.kp)  # keys beyond the tile's last query are never seen
            if kn <= 0:
                continue
            if op.kp + kn - 1 > op.qp + a:  # some (query, key) pairs in the tile are acausal
                qpos = torch.arange(op.qp + a, op.qp + b, device=device)
                kpos = torch.arange(op.kp, op.kp + kn, device=device)
                mask = kpos[None, :] > qpos[:, None]
        yield a, b, kn, mask


class _Ring:
    """Neighbour exchange over the CP group (rank r sends to r+1 and receives from r-1)."""

    def __init__(self, group) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        ranks = dist.get_process_group_ranks(group)
        self.next = ranks[(self.rank + 1) % self.size]
        self.prev = ranks[(self.rank - 1) % self.size]

    def start(self, tensor: Tensor, tag: int):
        # One batch_isend_irecv per exchange (as megatron's p2p_communication and Transformer Engine
        # do): NCCL blocks an ungrouped send until the peer posts the matching receive, which
        # deadlocks a ring where every rank sends first. Tags separate K/V blocks from gradient
        # accumulators (same shape) on gloo only; NCCL ignores them and matches a pair's messages
        # in posting order, which is why callers must post exchanges in the same order on every rank.
        recv = torch.empty_like(tensor)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, tensor, self.next, self.group, tag),
                                        dist.P2POp(dist.irecv, recv, self.prev, self.group, tag)])
        return works, recv

    @staticmethod
    def finish(handle) -> Tensor:
        works, recv = handle
        for w in works:
            w.wait()
        return recv


def _fwd_block(qs: Tensor, k: Tensor, v: Tensor, layout: RowLayout, q_rank: int, kv_rank: int, cp: int,
               causal: bool, out: Tensor, lse: Tensor) -> None:
    """Merge attention of one row's local queries against one (visiting) K/V row into out/lse.

    qs [g, rep, s, d] (pre-scaled), k/v [g, s, d]; out [g, rep, s, d], lse [g, rep, s] updated in place.
    """
    heads = qs.shape[0] * qs.shape[1]
    for op in _ops(layout, q_rank, kv_rank, cp, causal):
        kk = k[:, None, op.ks:op.ks + op.kn]
        vv = v[:, None, op.ks:op.ks + op.kn]
        for a, b, kn, mask in _tiles(op, heads, qs.device):
            rows = slice(op.qs + a, op.qs + b)
            s = qs[:, :, rows] @ kk[..., :kn, :].transpose(-1, -2)  # [g, rep, tq, kn]
            if mask is not None:
                s = s.masked_fill(mask, float("-inf"))
            blk_lse = torch.logsumexp(s, dim=-1)
            safe = torch.where(torch.isinf(blk_lse), torch.zeros_like(blk_lse), blk_lse)
            blk_out = torch.exp(s - safe[..., None]) @ vv[..., :kn, :]
            old = lse[:, :, rows]
            new = torch.logaddexp(old, blk_lse)
            dead = torch.isinf(new)
            w_old = torch.where(dead, torch.zeros_like(new), torch.exp(old - new))
            w_new = torch.where(dead, torch.zeros_like(new), torch.exp(blk_lse - new))
            out[:, :, rows] = out[:, :, rows] * w_old[..., None] + blk_out * w_new[..., None]
            lse[:, :, rows] = new


def _bwd_block(qs: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor, delta: Tensor, layout: RowLayout,
               q_rank: int, kv_rank: int, cp: int, causal: bool, scale: float, dq: Tensor, dk: Tensor,
               dv: Tensor) -> None:
    """Accumulate one row's dq (local queries) and dk/dv (visiting keys) for one ring step."""
    heads = qs.shape[0] * qs.shape[1]
    for op in _ops(layout, q_rank, kv_rank, cp, causal):
        for a, b, kn, mask in _tiles(op, heads, qs.device):
            rows = slice(op.qs + a, op.qs + b)
            kk = k[:, None, op.ks:op.ks + kn]
            vv = v[:, None, op.ks:op.ks + kn]
            q_t = qs[:, :, rows]
            s = q_t @ kk.transpose(-1, -2)
            if mask is not None:
                s = s.masked_fill(mask, float("-inf"))
            row_lse = lse[:, :, rows]
            safe = torch.where(torch.isinf(row_lse), torch.zeros_like(row_lse), row_lse)
            p = torch.exp(s - safe[..., None])
            p = torch.where(torch.isinf(row_lse)[..., None], torch.zeros_like(p), p)
            do = dout[:, :, rows]
            dv[:, op.ks:op.ks + kn] += (p.transpose(-1, -2) @ do).sum(1)
            ds = p * (do @ vv.transpose(-1, -2) - delta[:, :, rows, None])
            dq[:, :, rows] += (ds @ kk) * scale
            dk[:, op.ks:op.ks + kn] += (ds.transpose(-1, -2) @ q_t).sum(1)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, layouts: Sequence[RowLayout], causal: bool,
                scale: float, group) -> Tensor:
        # q [s, b, np, d], k/v [s, b, ng, d] -> compute layout [b, g, rep, s, d] / [b, g, s, d], fp32
        s_len, batch, nh, d = q.shape
        ng = k.shape[2]
        rep = nh // ng
        ring = _Ring(group) if group is not None else None
        cp, rank = (ring.size, ring.rank) if ring is not None else (1, 0)
        qs = (q.float() * scale).permute(1, 2, 0, 3).reshape(batch, ng, rep, s_len, d).contiguous()
        kv = torch.stack([k.float().permute(1, 2, 0, 3), v.float().permute(1, 2, 0, 3)]).contiguous()
        out = torch.zeros(batch, ng, rep, s_len, d, dtype=torch.float32, device=q.device)
        lse = torch.full((batch, ng, rep, s_len), float("-inf"), dtype=torch.float32, device=q.device)
        cur = kv
        for step in range(cp):
            pending = ring.start(cur, _KV_TAG) if step < cp - 1 else None
            src = (rank - step) % cp
            for row in range(batch):
                _fwd_block(qs[row], cur[0, row], cur[1, row], layouts[row], rank, src, cp, causal,
                           out[row], lse[row])
            if pending is not None:
                cur = _Ring.finish(pending)
        ctx.save_for_backward(qs, kv, out, lse)
        ctx.layouts, ctx.causal, ctx.scale, ctx.group = layouts, causal, scale, group
        ctx.in_dtype = q.dtype
        return out.permute(3, 0, 1, 2, 4).reshape(s_len, batch, nh * d).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        qs, kv, out, lse = ctx.saved_tensors
        batch, ng, rep, s_len, d = qs.shape
        ring = _Ring(ctx.group) if ctx.group is not None else None
        cp, rank = (ring.size, ring.rank) if ring is not None else (1, 0)
        dout = grad_out.float().reshape(s_len, batch, ng, rep, d).permute(1, 2, 3, 0, 4).contiguous()
        delta = (dout * out).sum(-1)  # [b, g, rep, s]
        dq = torch.zeros_like(qs)
        cur = kv
        dkv = torch.zeros_like(kv)  # gradients for the K/V block currently held (starts with our own)
        # Two exchanges are in flight per step; the posting order (K/V of step i, then dK/dV of step
        # i) depends on the step only, never on the rank, so NCCL's in-order matching pairs them right.
        for step in range(cp):
            pending = ring.start(cur, _KV_TAG) if step < cp - 1 else None
            src = (rank - step) % cp
            for row in range(batch):
                _bwd_block(qs[row], cur[0, row], cur[1, row], dout[row], lse[row], delta[row], ctx.layouts[row],
                           rank, src, cp, ctx.causal, ctx.scale, dq[row], dkv[0, row], dkv[1, row])
            if ring is not None:
                # The accumulator follows its K/V block; after the last step it goes home.
                dkv = _Ring.finish(ring.start(dkv, _GRAD_TAG))
            if pending is not None:
                cur = _Ring.finish(pending)

        def to_sbhd(t: Tensor) -> Tensor:  # [b, heads, s, d] -> [s, b, heads, d]
            return t.permute(2, 0, 1, 3).contiguous().to(ctx.in_dtype)

        dq = dq.reshape(batch, ng * rep, s_len, d)
        return to_sbhd(dq), to_sbhd(dkv[0]), to_sbhd(dkv[1]), None, None, None, None


def ring_attention(query: Tensor, key: Tensor, value: Tensor, *, causal: bool, softmax_scale: float,
                   packed_seq_params: Optional[PackedSeqParams] = None, cp_group=None) -> Tensor:
    """Self-attention of this rank's tokens against the whole (packed) sequence held by ``cp_group``.

    query [s, b, np, hn], key/value [s, b, ng, hn] (GQA: np a multiple of ng) in the zigzag layout;
    returns [s, b, np * hn]. ``cp_group=None`` (or a group of one) is plain blockwise attention.
    """
    if query.dim() != 4 or key.shape != value.shape or key.shape[:2] != query.shape[:2]:
        raise ValueError(f"expected query [s, b, np, hn] and key/value [s, b, ng, hn], got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if query.shape[2] % key.shape[2]:
        raise ValueError(f"{query.shape[2]} query heads are not a multiple of {key.shape[2]} key/value heads")
    if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
        raise ValueError("ring_attention takes sbhd tensors; qkv_format='thd' is the Transformer Engine path")
    cp = dist.get_world_size(cp_group) if cp_group is not None else 1
    group = cp_group if cp > 1 else None
    layouts = row_layouts(packed_seq_params, query.shape[1], query.shape[0], cp)
    return _RingAttention.apply(query, key, value, layouts, causal, float(softmax_scale), group)
