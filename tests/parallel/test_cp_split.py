"""Per-sub-sample zigzag CP index map (tokens and V2PE positions are sliced with the same map)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from v2pe_megatron.parallel.cp_split import cp_local_seq_lens, split_for_cp, tile_share, zigzag_index_map, zigzag_owner


def megatron_zigzag(x: torch.Tensor, cp: int, rank: int, seq_dim: int = 1) -> torch.Tensor:
    """megatron's get_batch_on_this_cp_rank layout (per-sequence balancing), written out with
    view + index_select as it does, without a process group."""
    v = x.view(*x.shape[:seq_dim], 2 * cp, x.shape[seq_dim] // (2 * cp), *x.shape[seq_dim + 1:])
    v = v.index_select(seq_dim, torch.tensor([rank, 2 * cp - rank - 1]))
    return v.reshape(*x.shape[:seq_dim], -1, *x.shape[seq_dim + 1:])


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_single_sub_sample_equals_megatron_layout(cp):
    tokens = torch.arange(2 * 48).view(2, 48) * 10  # [B, S]
    positions = torch.rand(2, 48, dtype=torch.float64)
    for rank in range(cp):
        idx = zigzag_index_map([48], cp, rank)
        assert idx.dtype == np.int64
        torch.testing.assert_close(split_for_cp(tokens, idx, 1), megatron_zigzag(tokens, cp, rank))
        torch.testing.assert_close(split_for_cp(positions, torch.from_numpy(idx), 1),
                                   megatron_zigzag(positions, cp, rank), rtol=0, atol=0)


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_packed_sub_samples_partition_and_balance(cp):
    lens = [2 * cp * k for k in (5, 1, 3, 2)] + [0]
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    total = sum(lens)
    maps = [zigzag_index_map(lens, cp, r) for r in range(cp)]
    np.testing.assert_array_equal(np.sort(np.concatenate(maps)), np.arange(total))
    assert {m.size for m in maps} == {total // cp}
    assert sum(cp_local_seq_lens(lens, cp)) == total // cp
    for r, m in enumerate(maps):
        off = 0
        for s, n in zip(starts, lens):
            c = n // (2 * cp)
            expect = np.concatenate([s + r * c + np.arange(c), s + (2 * cp - 1 - r) * c + np.arange(c)])
            np.testing.assert_array_equal(m[off:off + 2 * c], expect)
            off += 2 * c
        # Per sub-sample, this is megatron's single-sequence layout.
        seq = torch.arange(total)[None]
        off = 0
        for s, n in zip(starts, lens):
            if n:
                local = megatron_zigzag(seq[:, s:s + n], cp, r)[0].numpy()
                np.testing.assert_array_equal(m[off:off + n // cp], local)
            off += n // cp


def test_cp_one_is_identity_and_lengths():
    np.testing.assert_array_equal(zigzag_index_map([3, 5], 1, 0), np.arange(8))
    assert cp_local_seq_lens([8, 16, 4], 2) == [4, 8, 2]
    assert cp_local_seq_lens([3, 5], 1) == [3, 5]


def test_clear_errors():
    with pytest.raises(ValueError, match=r"sub-sample 1 has padded length 6, which is not a multiple of 4"):
        zigzag_index_map([8, 6], 2, 0)
    with pytest.raises(ValueError, match="not a multiple"):
        cp_local_seq_lens([12], 4)
    with pytest.raises(ValueError, match=r"cp_rank must be in \[0, 2\)"):
        zigzag_index_map([8], 2, 2)
    with pytest.raises(ValueError, match="cp_size"):
        zigzag_index_map([8], 0, 0)


def test_split_for_cp_on_other_dims():
    x = torch.arange(2 * 8 * 3).view(2, 8, 3)
    idx = zigzag_index_map([8], 2, 1)
    torch.testing.assert_close(split_for_cp(x.transpose(0, 1), idx, 0), megatron_zigzag(x, 2, 1).transpose(0, 1))


@pytest.mark.parametrize("lens,cp", [([8, 16, 0, 24], 2), ([16, 32], 4), ([24], 1)])
def test_zigzag_owner_inverts_the_index_maps(lens, cp):
    owner = zigzag_owner(lens, cp)
    for r in range(cp):
        assert (owner[zigzag_index_map(lens, cp, r)] == r).all()
    assert np.bincount(owner, minlength=cp).tolist() == [sum(lens) // cp] * cp


@pytest.mark.parametrize("tiles,cp", [(0, 4), (3, 4), (6, 4), (8, 4), (13, 3), (5, 1)])
def test_tile_shares_cover_the_tiles_once_in_order(tiles, cp):
    shares = [tile_share(tiles, cp, r) for r in range(cp)]
    assert shares[0][0] == 0 and shares[-1][1] == tiles
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    assert max(b - a for a, b in shares) == -(-tiles // cp)
    with pytest.raises(ValueError, match="cp_rank"):
        tile_share(tiles, cp, cp)
