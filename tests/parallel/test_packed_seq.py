"""Packed batch -> PackedSeqParams and the CP split, in both formats.

The thd test pins the Transformer Engine layout without a GPU: each CP rank's share of the flattened
pack carries its own tokens' V2PE positions, and rotating its [t, heads, d] queries with the cos/sin
of those positions (what ``model.attention.V2PERotary`` does) equals the sbhd path on the same rank.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from v2pe_megatron.parallel.batch import MicroBatch
from v2pe_megatron.parallel.cp_split import image_feature_index, tile_share, zigzag_index_map
from v2pe_megatron.parallel.layout import Layout, seq_multiple
from v2pe_megatron.parallel.packed_seq import PackParams, host_cu_seqlens, packed_seq_params, split_batch_for_cp
from v2pe_megatron.v2pe import V2PERotaryEmbedding, apply_rotary

ROWS = [[16, 8, 24, 16], [40, 8, 16, 0]]  # multiples of 8, each row 64 tokens
S = 64


def _batch(seed: int = 0) -> MicroBatch:
    g = torch.Generator().manual_seed(seed)
    pos = []
    for r in ROWS:  # fractional positions restarting per sub-sample
        pos.append(torch.cat([torch.cumsum(torch.where(torch.rand(n, generator=g) < 0.5, 0.25, 1.0).double(), 0)
                              for n in r if n]))
    tokens = torch.randint(8, 500, (2, S), generator=g)
    tokens[0, 3:7] = 7
    tokens[1, 41:49] = 7
    return MicroBatch(tokens=tokens, labels=tokens.roll(-1, 1), loss_mask=torch.rand(2, S, generator=g),
                      position_ids=torch.stack(pos), seq_lens=[torch.tensor(r) for r in ROWS])


def test_seq_multiple_and_cu_seqlens():
    assert seq_multiple(1) == 1 and seq_multiple(2) == 4 and seq_multiple(4, 2, True) == 16
    p = packed_seq_params(ROWS, cp_size=4)
    assert p.qkv_format == "sbhd" and p.max_seqlen_q == 40
    assert [c.tolist() for c in p.cu_seqlens_q_padded] == [[0, 16, 24, 48, 64], [0, 40, 48, 64, 64]]
    t = packed_seq_params(ROWS, qkv_format="thd", seq_lens_unpadded=[[13, 8, 20, 16], [33, 8, 9, 0]])
    assert t.cu_seqlens_q_padded.tolist() == [0, 16, 24, 48, 64, 104, 112, 128, 128]
    assert t.cu_seqlens_q.tolist() == [0, 13, 21, 41, 57, 90, 98, 107, 107]
    assert t.cu_seqlens_q_padded.dtype == torch.int32
    # The same lengths as Python ints, for attention to read without a device round trip.
    assert isinstance(p, PackParams) and isinstance(t, PackParams)
    assert host_cu_seqlens(p, 2) == ([[0, 16, 24, 48, 64], [0, 40, 48, 64, 64]], None)
    assert host_cu_seqlens(t, 1) == ([t.cu_seqlens_q_padded.tolist()], [t.cu_seqlens_q.tolist()])
    plain = dataclasses.replace(p)  # a copy is still a PackParams; a bare PackedSeqParams is read back
    assert host_cu_seqlens(PackedSeqParams(**{f.name: getattr(plain, f.name) for f in dataclasses.fields(PackedSeqParams)}),
                           2)[0] == host_cu_seqlens(p, 2)[0]


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_sbhd_split_partitions_every_row(cp):
    b = _batch()
    parts = [split_batch_for_cp(b, cp_size=cp, cp_rank=r) for r in range(cp)]
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        for row in range(2):
            got = torch.cat([getattr(p, key)[row] for p in parts])
            idx = np.concatenate([zigzag_index_map(ROWS[row], cp, r) for r in range(cp)])
            torch.testing.assert_close(got, getattr(b, key)[row][torch.from_numpy(idx)], rtol=0, atol=0)
    assert all(p.tokens.shape == (2, S // cp) for p in parts)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_thd_share_rotates_like_the_sbhd_split(cp):
    b = _batch()
    rope = V2PERotaryEmbedding(16, 10000.0)
    heads = torch.randn(2 * S, 3, 16, generator=torch.Generator().manual_seed(1))  # the flattened pack [t, h, d]
    for rank in range(cp):
        thd = split_batch_for_cp(b, cp_size=cp, cp_rank=rank, qkv_format="thd")
        sbhd = split_batch_for_cp(b, cp_size=cp, cp_rank=rank)
        index = torch.from_numpy(zigzag_index_map([n for r in ROWS for n in r], cp, rank))
        assert thd.position_ids.shape == (1, 2 * S // cp)  # the rank's own tokens, like every field
        torch.testing.assert_close(thd.position_ids[0], b.position_ids.reshape(-1)[index], rtol=0, atol=0)
        local = heads[index]                                               # this rank's tokens, thd order
        torch.testing.assert_close(thd.tokens[0], b.tokens.reshape(-1)[index], rtol=0, atol=0)
        cos, sin = rope.cos_sin(thd.position_ids)                          # [t, 1, 1, d]
        got = apply_rotary(local, cos[:, 0], sin[:, 0])
        # sbhd: per-row split positions -> per-token cos/sin [s, b, 1, d], rows laid side by side
        cos, sin = rope.cos_sin(sbhd.position_ids)                         # [S/cp, 2, 1, 16]
        t = local.reshape(2, S // cp, 3, 16).transpose(0, 1)               # [S/cp, 2, h, d]
        want = apply_rotary(t, cos, sin).transpose(0, 1).reshape(-1, 3, 16)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["sbhd", "thd"])
@pytest.mark.parametrize("cp", [2, 4])
def test_image_exchange_delivers_what_the_tokens_take(fmt, cp):
    """Simulated all-to-all of every rank's plan: each rank receives exactly the feature rows its
    local <IMG_CONTEXT> tokens take (the all-gather path's image_feature_index), in order, and holds
    only its tile share."""
    b = _batch()
    n_ctx = int((b.tokens == 7).sum())        # 12 = 6 tiles x 2 tokens
    tiles = 6
    b = b.replace(pixel_values=torch.arange(tiles, dtype=torch.float32).reshape(tiles, 1, 1, 1).expand(tiles, 3, 2, 2),
                  num_tiles=torch.tensor([2, 4], dtype=torch.int32))
    feats = torch.arange(n_ctx)               # feature row g, as a value
    parts = [split_batch_for_cp(b, cp_size=cp, cp_rank=r, qkv_format=fmt, img_context_id=7) for r in range(cp)]
    sent = {}
    for r, part in enumerate(parts):
        start, stop = tile_share(tiles, cp, r)
        assert part.tile_range == part.image_exchange.tile_range == (start, stop)
        assert part.pixel_values[:, 0, 0, 0].tolist() == list(range(start, stop))
        plan = part.image_exchange
        rows = feats[start * 2:stop * 2][plan.send_rows]
        sent[r] = rows.split(list(plan.send_counts))
    for r, part in enumerate(parts):
        got = torch.cat([sent[s][r] for s in range(cp)])
        assert parts[r].image_exchange.recv_counts == tuple(len(sent[s][r]) for s in range(cp))
        if fmt == "thd":
            maps = [zigzag_index_map([n for row in ROWS for n in row], cp, r)]
        else:
            maps = [zigzag_index_map(row, cp, r) for row in ROWS]
        want = image_feature_index(b.tokens, maps, 7)
        torch.testing.assert_close(got, want)
        assert got.numel() == int((part.tokens == 7).sum())


def test_a_loader_share_is_checked_against_the_rule():
    b = _batch().replace(pixel_values=torch.zeros(3, 3, 2, 2), num_tiles=torch.tensor([2, 4], dtype=torch.int32))
    ok = split_batch_for_cp(b.replace(tile_range=(0, 3)), cp_size=2, cp_rank=0, img_context_id=7)
    assert ok.pixel_values.shape[0] == 3 and ok.image_exchange.tile_range == (0, 3)
    with pytest.raises(ValueError, match=r"share is \[3, 6\).*cp_rank"):
        split_batch_for_cp(b.replace(tile_range=(0, 3)), cp_size=2, cp_rank=1, img_context_id=7)
    with pytest.raises(ValueError, match="num_tiles add up to 6"):
        split_batch_for_cp(b, cp_size=2, cp_rank=0, img_context_id=7)


def test_training_feeds_te_models_thd():
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.training.forward import prepare_batch

    assert Layout(spec="local").qkv_format == "sbhd" and Layout(spec="te").qkv_format == "thd"
    with model_parallel():
        b = prepare_batch(_batch(), Layout(spec="te"), torch.device("cpu"), torch.float32, 7)
        s = prepare_batch(_batch(), Layout(spec="local"), torch.device("cpu"), torch.float32, 7)
    assert b.tokens.shape == (1, 2 * S) and b.position_ids.shape == (1, 2 * S)  # cp=1: the whole pack
    assert b.packed_seq_params.qkv_format == "thd"
    assert b.packed_seq_params.cu_seqlens_q_padded.tolist() == [0, 16, 24, 48, 64, 104, 112, 128, 128]
    assert s.tokens.shape == (2, S) and s.packed_seq_params.qkv_format == "sbhd"
