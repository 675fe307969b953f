"""Packing: shifted labels and masks per sub-sample, padding segments, pad_multiple, greedy grouping
under token and tile caps, safe truncation, collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from v2pe_megatron.data.packing import Packer, PreparedSample, build_pack, collate, safe_cut, truncate_or_skip
from v2pe_megatron.data.skips import SampleError

PAD, START, END, CTX = 0, 5, 6, 7


def _sample(sid, tokens, target, tiles=0, side=4):
    tokens = np.asarray(tokens, np.int64)
    return PreparedSample(sid, tokens, np.asarray(target, bool), np.arange(tokens.size, dtype=np.float64) * 1.0,
                          np.full((tiles, 3, side, side), float(sid), np.float32),
                          np.asarray([tiles] if tiles else [], np.int32),
                          np.asarray([0.5] if tiles else [], np.float64))


def test_build_pack_by_hand():
    a = _sample(10, [1, 20, 21, 22, 23], [0, 0, 1, 1, 1], tiles=2)
    b = _sample(11, [1, 30, 31], [0, 1, 1])
    p = build_pack([a, b], 16, pad_id=PAD, pad_multiple=4, image_shape=(3, 4, 4))
    np.testing.assert_array_equal(p["tokens"], [1, 20, 21, 22, 23, 0, 0, 0, 1, 30, 31, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(p["labels"], [20, 21, 22, 23, 0, 0, 0, 0, 30, 31, 0, 0, 0, 0, 0, 0])
    # loss at i iff tokens[i+1] is a target of the same sub-sample; never on the last token or padding
    np.testing.assert_array_equal(p["loss_mask"], [0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(p["seq_lens"], [8, 4, 4])
    np.testing.assert_array_equal(p["position_ids"], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 0, 1, 2, 3])
    assert p["position_ids"].dtype == np.float64 and p["loss_mask"].dtype == np.float32
    assert p["pixel_values"].shape == (2, 3, 4, 4) and (p["pixel_values"] == 10).all()
    np.testing.assert_array_equal(p["num_tiles"], [2])
    np.testing.assert_array_equal(p["sample_ids"], [10, 11])
    np.testing.assert_array_equal(p["deltas"], [0.5])
    # exactly full: no padding segment
    full = build_pack([b], 3, pad_id=PAD)
    np.testing.assert_array_equal(full["seq_lens"], [3])
    assert full["pixel_values"].shape == (0, 3, 448, 448)


def test_greedy_grouping_matches_a_plain_loop():
    rng = np.random.default_rng(1)
    samples = []
    for i in range(60):
        n = int(rng.integers(2, 40))
        samples.append(_sample(i, rng.integers(10, 90, n), rng.random(n) < 0.5, tiles=int(rng.integers(0, 4))))
    S, T, m = 64, 5, 4
    packer = Packer(S, max_tiles_per_pack=T, pad_id=PAD, pad_multiple=m, image_shape=(3, 4, 4))
    packs = [p for s in samples for p in packer.add(s)] + [packer.flush()]
    # independent expectation
    groups, cur, tok, til = [], [], 0, 0
    for s in samples:
        lp = -(-s.length // m) * m
        if cur and (tok + lp > S or til + s.tiles > T):
            groups.append(cur)
            cur, tok, til = [], 0, 0
        cur.append(s.sample_id)
        tok, til = tok + lp, til + s.tiles
    groups.append(cur)
    assert [p["sample_ids"].tolist() for p in packs] == groups
    for p in packs:
        assert p["seq_lens"].sum() == S and (p["seq_lens"][: len(p["sample_ids"])] % m == 0).all()
        assert p["pixel_values"].shape[0] == p["num_tiles"].sum() <= T

    nopack = Packer(S, max_tiles_per_pack=T, pad_id=PAD, packing=False)
    assert [len(nopack.add(s)) for s in samples[:5]] == [1] * 5


def test_sample_that_cannot_fit_is_a_skip():
    packer = Packer(8, max_tiles_per_pack=2, pad_id=PAD)
    with pytest.raises(SampleError) as e:
        packer.add(_sample(0, list(range(9)), [1] * 9))
    assert e.value.reason == "too_long"
    with pytest.raises(SampleError) as e:
        packer.add(_sample(0, [1, 2], [0, 1], tiles=3))
    assert e.value.reason == "too_many_tiles"


def test_safe_truncation_never_cuts_an_image():
    toks = np.array([1, 9, 9, START, CTX, CTX, CTX, CTX, END, 9, 9, START, CTX, CTX, END, 9], np.int64)
    for limit in range(1, toks.size + 1):
        cut = safe_cut(toks, limit, START, END)
        assert cut <= limit
        head = toks[:cut]
        assert np.count_nonzero(head == START) == np.count_nonzero(head == END)  # no open image
        # the cut is the largest such length
        if cut < limit:
            assert toks[cut] == START
    assert safe_cut(toks, 6, START, END) == 3
    assert safe_cut(toks, 10, START, END) == 10
    tgt = np.ones(toks.size, bool)
    t, g, n = truncate_or_skip(toks, tgt, 13, "truncate", img_start_id=START, img_end_id=END)
    assert t.size == 11 and n == 1 and g.size == 11
    with pytest.raises(SampleError):
        truncate_or_skip(toks, tgt, 13, "skip", img_start_id=START, img_end_id=END)


def test_collate_rows():
    a = build_pack([_sample(1, [1, 2, 3], [0, 1, 1], tiles=1)], 8, pad_id=PAD, image_shape=(3, 4, 4))
    b = build_pack([_sample(2, [1, 2], [0, 1]), _sample(3, [1, 2, 3, 4], [0, 0, 1, 1], tiles=2)], 8, pad_id=PAD,
                   image_shape=(3, 4, 4))
    batch = collate([a, b])
    assert batch.tokens.shape == (2, 8) and batch.position_ids.dtype == torch.float64
    assert batch.pixel_values.shape == (3, 3, 4, 4)
    assert batch.num_tiles.tolist() == [1, 2] and batch.num_images == 2
    assert [s.tolist() for s in batch.seq_lens] == [[3, 5], [2, 4, 2]]
    assert [ids.tolist() for ids in batch.sample_ids] == [[1], [2, 3]]
