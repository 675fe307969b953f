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
    # no system turn: InternVL's (the template's default) is 162 tokens in the tiny tokenizer
    return load_recipe(None, ["model.preset=tiny", "data.seq_length=512", "data.system_prompt=''",
                              "data.max_dynamic_patch=4",
                              "data.micro_batch_size=2", "data.global_batch_size=2", "data.max_tiles_per_pack=32",
                              "data.synthetic_num_samples=16", "data.dali_device=cpu", *extra])


def _spy(loader) -> list[int]:
    """Tiles the loader's tiler produced, call by call."""
    made, tiler = [], loader.tiler

    def counting(encoded, grids, **kw):
        out = tiler(encoded, grids, **kw)
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


def test_a_decode_failure_under_cp_keeps_the_sample_with_blank_tiles(tmp_path, caplog):
    """Without CP the sample is dropped; a CP rank cannot drop it alone, so every rank keeps it (same
    tokens everywhere) and the rank holding the image's tiles holds zeros for them."""
    import io
    import json
    import logging

    from PIL import Image

    from v2pe_megatron.data.synthetic import draw_image, encode_image

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.png").write_bytes(encode_image(draw_image(rng, 120, 60, "red", "circle"), "png"))
    buf = io.BytesIO()
    Image.fromarray(draw_image(rng, 60, 60, "green", "square", noisy=True)).save(buf, "JPEG")
    (tmp_path / "img" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A shape."}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"id": i, "image": f, "conversations": conv})
                                                for i, f in (("a", "ok.png"), ("b", "cut.jpg"))) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": "img", "annotation": "d.jsonl"}}))
    r = _recipe(f"data.meta_path={tmp_path / 'meta.json'}", "data.micro_batch_size=1", "data.global_batch_size=1")
    whole = list(build_train_loader(r, dp_rank=0, dp_size=1, max_epochs=1, prefetch=0))
    assert sum(len(row) for b in whole for row in b.sample_ids) == 1  # dropped without CP
    caplog.set_level(logging.WARNING, logger="v2pe_megatron.data")
    parts = [list(build_train_loader(r, dp_rank=0, dp_size=1, max_epochs=1, prefetch=0, cp_rank=k, cp_size=2))
             for k in range(2)]
    assert [len(p) for p in parts] == [1, 1]
    a, b = parts[0][0], parts[1][0]
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=0)
    assert sum(len(row) for row in a.sample_ids) == 2  # kept under CP
    pix = torch.cat([a.pixel_values, b.pixel_values])
    assert pix.shape[0] == int(a.num_tiles.sum())
    # One image per sample, in pack order; sample id 1 is the cut image (line 2).
    bounds = np.concatenate([[0], np.cumsum(a.num_tiles.numpy())])
    for k, sid in enumerate(a.sample_ids[0].tolist()):
        got = pix[bounds[k]:bounds[k + 1]].abs().sum()
        assert (got == 0) if sid == 1 else (got > 0), (sid, got)
    assert "failed to decode" in caplog.text and "blank tiles" in caplog.text
