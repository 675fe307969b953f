"""Ring attention (context parallelism without Transformer Engine) against full attention.

Reference: plain float64 attention over the whole pack with an explicit mask (same sub-sample, key
not padding, causal by position), written independently of the ring's chunk-pair bookkeeping. Each
CP rank runs the ring on its zigzag slice; its outputs and its dq/dk/dv must equal the reference's
rows picked with the same index map.

The ring's point-to-point traffic is recorded too: what gloo tolerates but NCCL does not (an
ungrouped send, exchanges posted in a different order on different ranks) must not happen.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import NamedTuple, Optional

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


class P2P(NamedTuple):
    """One point-to-point op as posted."""

    kind: str                # "send" | "recv"
    peer: int                # global rank
    shape: tuple[int, ...]
    tag: int
    batch: Optional[int]     # index of the enclosing batch_isend_irecv call in this process; None: alone

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


@contextlib.contextmanager
def record_p2p():
    """Record every isend/irecv/send/recv of this process, alone or inside ``batch_isend_irecv``.

    Patched in ``torch.distributed`` (what callers look up) and in ``distributed_c10d`` too:
    ``P2POp`` only accepts an op that *is* that module's ``isend``/``irecv``, so a wrapper living only
    in ``torch.distributed`` would be rejected.
    """
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    names = ("isend", "irecv", "send", "recv", "batch_isend_irecv")
    real = {n: getattr(c10d, n) for n in names}
    log: list[P2P] = []
    state = {"batch": None, "count": 0}

    def global_peer(peer, group, group_peer) -> int:
        if peer is not None:
            return int(peer)
        return dist.get_global_rank(group if group is not None else dist.group.WORLD, group_peer)

    def single(name: str, kind: str):
        signature = inspect.signature(real[name])
        side = "dst" if kind == "send" else "src"

        def op(*args, **kwargs):
            # Inside a batch the batch's own record below already holds this op.
            if state["batch"] is None:
                a = signature.bind(*args, **kwargs).arguments
                peer = global_peer(a.get(side), a.get("group"), a.get(f"group_{side}"))
                log.append(P2P(kind, peer, tuple(a["tensor"].shape), a.get("tag", 0), None))
            return real[name](*args, **kwargs)
        return op

    wrapped = {"isend": single("isend", "send"), "irecv": single("irecv", "recv"),
               "send": single("send", "send"), "recv": single("recv", "recv")}

    def batch_isend_irecv(p2p_op_list):
        index = state["count"]
        state["count"] += 1
        for p in p2p_op_list:
            kind = "send" if p.op in (real["isend"], wrapped["isend"]) else "recv"
            log.append(P2P(kind, int(p.peer), tuple(p.tensor.shape), p.tag, index))
        state["batch"] = index
        try:
            return real["batch_isend_irecv"](p2p_op_list)
        finally:
            state["batch"] = None

    wrapped["batch_isend_irecv"] = batch_isend_irecv
    for n in names:
        setattr(dist, n, wrapped[n])
        setattr(c10d, n, wrapped[n])
    try:
        yield log
    finally:
        for n in names:
            setattr(dist, n, real[n])
            setattr(c10d, n, real[n])


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
    with record_p2p() as log:
        out = ra.ring_attention(lq, lk, lv, causal=causal, softmax_scale=scale,
                                packed_seq_params=_packed(padded_rows, real_rows), cp_group=group)
        out.backward(local(dout))
    sent = [op.numel for op in log if op.kind == "send"]
    if cp > 1:  # the ring only ever ships one rank's K/V (or their grads)
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


@pytest.mark.slow
@pytest.mark.parametrize("cp", [2, 4])
def test_ring_matches_full_attention(cp):
    cases = [(ROWS_CP4, REAL_CP4, True, None), (ROWS_CP4, REAL_CP4, False, None),
             ([[96], [40, 56]], [[96], [40, 50]], True, 256)]  # one sequence (megatron's plain CP) + tiling
    results = run_distributed(_ring_world, cp, cases, timeout=180)
    for rank, per_case in enumerate(results):
        for case, errs in zip(cases, per_case):
            assert max(errs[k] for k in ("out", "dq", "dk", "dv")) < 1e-5, (rank, case[2], errs)


def _p2p_world(seq_per_rank: int) -> dict:
    """Per CP layout in a world of 4: the ring's p2p log per phase, plus its neighbours (global ranks).

    CP=2 runs on the strided groups {0, 2} and {1, 3}, so group ranks differ from global ones."""
    import torch.distributed as dist

    import v2pe_megatron.model.ring_attention as ra

    torch.set_num_threads(1)
    rank = dist.get_rank()
    strided = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # every rank creates every group
    layouts = {4: (dist.group.WORLD, [0, 1, 2, 3]), 2: (strided[rank % 2], [rank % 2, rank % 2 + 2])}
    g = torch.Generator().manual_seed(rank)
    result = {}
    for cp, (group, ranks) in layouts.items():
        q = torch.randn(seq_per_rank, 1, HEADS, DIM, generator=g).requires_grad_()
        k, v = (torch.randn(seq_per_rank, 1, GROUPS, DIM, generator=g).requires_grad_() for _ in range(2))
        with record_p2p() as fwd:
            out = ra.ring_attention(q, k, v, causal=True, softmax_scale=DIM ** -0.5, cp_group=group)
        with record_p2p() as bwd:
            out.backward(torch.ones_like(out))
        i = ranks.index(rank)
        result[cp] = {"fwd": list(fwd), "bwd": list(bwd), "next": ranks[(i + 1) % cp],
                      "prev": ranks[(i - 1) % cp], "kv_shape": (2, 1, GROUPS, seq_per_rank, DIM)}
    return result


def _batches(log: list) -> list[list]:
    out: dict[int, list] = {}
    for op in log:
        out.setdefault(op.batch, []).append(op)
    return [out[b] for b in sorted(out)]


@pytest.mark.slow
def test_ring_exchanges_are_grouped_and_posted_in_the_same_order_on_every_rank():
    # NCCL blocks an ungrouped send until its receive is posted and matches the p2p messages between
    # a pair in posting order, ignoring tags; gloo hides both. So every exchange must be one
    # batch_isend_irecv (send to next, receive from prev), posted in the same order on every rank.
    # Expected batches per rank: forward cp-1 K/V exchanges (the last block is not passed on);
    # backward cp-1 K/V exchanges plus cp dK/dV exchanges (after the last step the accumulator
    # goes home), every one of them a [2, b, g, s_local, d] tensor. K/V and dK/dV blocks have the
    # same shape, so the recorded tag is what tells them apart (NCCL itself would not).
    import v2pe_megatron.model.ring_attention as ra

    per_rank = run_distributed(_p2p_world, 4, 4, timeout=180)
    for cp in (2, 4):
        sequences = []
        for rank, res in enumerate(per_rank):
            r = res[cp]
            for phase in ("fwd", "bwd"):
                alone = [op for op in r[phase] if op.batch is None]
                assert not alone, (cp, rank, phase, f"ungrouped point-to-point ops: {alone}")
            fwd, bwd = _batches(r["fwd"]), _batches(r["bwd"])
            assert [b[0].tag for b in fwd] == [ra._KV_TAG] * (cp - 1), (cp, rank, fwd)
            bwd_tags = [b[0].tag for b in bwd]
            assert (bwd_tags.count(ra._KV_TAG), bwd_tags.count(ra._GRAD_TAG)) == (cp - 1, cp), (cp, rank, bwd)
            for batch in fwd + bwd:
                assert sorted((op.kind, op.peer) for op in batch) == [("recv", r["prev"]), ("send", r["next"])], \
                    (cp, rank, batch)
                assert all(op.shape == r["kv_shape"] and op.tag == batch[0].tag for op in batch), (cp, rank, batch)
            # Peers differ by rank; what each rank posts, in which order, must not.
            sequences.append([[(op.kind, op.shape, op.tag) for op in batch] for batch in fwd + bwd])
        assert all(seq == sequences[0] for seq in sequences), (cp, sequences)
