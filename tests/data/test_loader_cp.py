"""The loader under context parallelism: CP rank r of cp decodes and holds only its tile share
(``parallel.cp_split.tile_share``) of every micro-batch, and the shares of all ranks are, in order,
exactly the tiles the loader gives without CP; tokens and metadata are the same on every CP rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from v2pe_megatron.config import load_recipe
from v2pe_megatron.data.loader import build_train_loader
from v2pe_megatron.parallel.cp_split import tile_share


def _recipe(*extra: str):
    return load_recipe(None, ["model.preset=tiny", "data.seq_length=512", "data.max_dynamic_patch=4",
                              "data.micro_batch_size=2", "data.global_batch_size=2", "data.max_tiles_per_pack=32",
                              "data.synthetic_num_samples=16", "data.dali_device=cpu", *extra])


def _spy(loader) -> list[int]:
    """Tiles the loader's tiler produced, call by call."""
    made, tiler = [], loader.tiler

    def counting(encoded, grids):
        out = tiler(encoded, grids)
        made.append(sum(a.shape[0] for a in out if isinstance(a, np.ndarray)))
        return out

    loader.tiler = counting
    return made


@pytest.mark.parametrize("cp", [2, 3])
def test_cp_ranks_hold_their_share_and_together_the_whole(cp):
    r = _recipe()
    whole_loader = build_train_loader(r, dp_rank=0, dp_size=1, max_epochs=1, prefetch=0)
    whole_made = _spy(whole_loader)
    whole = list(whole_loader)
    assert whole and any(b.num_tiles.sum() % cp for b in whole)  # unequal shares occur
    shares, made = [], []
    for rank in range(cp):
        ld = build_train_loader(r, dp_rank=0, dp_size=1, max_epochs=1, prefetch=0, cp_rank=rank, cp_size=cp)
        made.append(_spy(ld))
        shares.append(list(ld))
        assert ld.stats == whole_loader.stats  # the same packs, counted whole on every rank
    for k, ref in enumerate(whole):
        total = int(ref.num_tiles.sum())
        assert ref.tile_range is None and ref.pixel_values.shape[0] == total
        parts = [s[k] for s in shares]
        for rank, b in enumerate(parts):
            assert b.tile_range == tile_share(total, cp, rank)
            assert b.pixel_values.shape[0] == b.tile_range[1] - b.tile_range[0]
            for f in ("tokens", "labels", "loss_mask", "position_ids", "num_tiles", "deltas"):
                torch.testing.assert_close(getattr(b, f), getattr(ref, f), rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([b.pixel_values for b in parts]), ref.pixel_values, rtol=0, atol=0)
    # Decoding is shared too: together the ranks tile at most each boundary image twice, never all of it.
    assert sum(sum(m) for m in made) < cp * sum(whole_made)
    for m in made:
        assert sum(m) < sum(whole_made)


def test_cp_rank_out_of_range_is_refused():
    with pytest.raises(ValueError, match="cp_rank 2 not in"):
        build_train_loader(_recipe(), dp_rank=0, dp_size=1, cp_rank=2, cp_size=2)
