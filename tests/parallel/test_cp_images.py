"""Images under context parallelism at length: a CP=4 run of the tiny model on one 64K-token pack of
many short sub-samples with many images. Each CP rank holds (and its vision tower encodes) only its
tile share; the loss and every gradient equal CP=1's and the all-gather reference path's.

The pack is built the way the loader builds it (``data.packing``, ``testing.tiny.image_pack``); the
CP ranks never hold another rank's pixels: tile i's pixels are a pure function of i, so each rank
makes only its share (what the
loader's CP path yields, ``tests/data/test_loader_cp.py``). The gradients are taken without DDP: each
rank's backward of its tokens' share of the mean loss, summed over the CP group (what megatron's DDP
does over the data-and-context-parallel group).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from v2pe_megatron.parallel.cp_split import tile_share
from v2pe_megatron.testing.distributed import run_distributed
from v2pe_megatron.testing.tiny import IMG_CTX, image_pack, tile_pixels

SEQ = 65536
CP = 4
SIDE = 28          # 28 px tiles: 4 patches, one LLM token per tile after the pixel shuffle
OVERRIDES = ["model.preset=tiny", f"data.seq_length={SEQ}", f"model.vision.image_size={SIDE}",
             "model.vision.num_layers=1", "model.language.num_layers=2", f"model.language.max_position_embeddings={SEQ}"]


def make_pack():
    return image_pack(SEQ, pad_multiple=2 * CP, side=SIDE, tokens_per_tile=1)


def tiles(start: int, stop: int) -> torch.Tensor:
    return tile_pixels(start, stop, SIDE)


def _run(cp: int, weights, path: str) -> dict:
    """Loss and CP-summed gradients of one forward/backward of the pack. path: 'exchange' (tile
    shares + all-to-all), 'allgather' (every tile on every rank, the reference path), 'whole' (cp=1)."""
    import time

    from megatron.core import parallel_state as ps

    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.cp_split import image_feature_index, zigzag_index_map
    from v2pe_megatron.parallel.packed_seq import split_batch_for_cp
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing.tiny import layout_of

    torch.set_num_threads(1)
    recipe = load_recipe(None, OVERRIDES + [f"parallel.cp={cp}"])
    with model_parallel(cp=cp, seed=3):
        model = build_model(recipe.model, layout_of(recipe))
        if weights is not None:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(torch.from_numpy(weights[n]))
        encoded: list[int] = []
        model.vision_model.register_forward_hook(lambda m, a, o: encoded.append(int(a[0].shape[0])))
        rank = ps.get_context_parallel_rank()
        batch = make_pack()
        total = int(batch.num_tiles.sum())
        if path == "exchange":
            start, stop = tile_share(total, cp, rank)
            batch = batch.replace(pixel_values=tiles(start, stop), tile_range=(start, stop))
        else:
            batch = batch.replace(pixel_values=tiles(0, total))
        held = int(batch.pixel_values.nbytes)
        b = split_batch_for_cp(batch, cp_size=cp, cp_rank=rank, img_context_id=IMG_CTX if path == "exchange" else None)
        idx = None
        if path == "allgather":
            idx = image_feature_index(batch.tokens, [zigzag_index_map(r.tolist(), cp, rank) for r in batch.seq_lens],
                                      IMG_CTX)
        n_total = float(batch.loss_mask.sum())
        t0 = time.perf_counter()
        loss = model(b.tokens, b.position_ids, b.pixel_values, labels=b.labels, packed_seq_params=b.packed_seq_params,
                     image_feature_index=idx, image_exchange=b.image_exchange)
        loss = (loss.float() * b.loss_mask).sum() / n_total
        loss.backward()
        seconds = time.perf_counter() - t0
        group = ps.get_context_parallel_group()
        total_loss = loss.detach().clone()
        torch.distributed.all_reduce(total_loss, group=group)
        grads = {}
        for n, p in model.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.distributed.all_reduce(g, group=group)
            grads[n] = g.numpy()
        out = {"loss": float(total_loss), "encoded": encoded, "held_bytes": held, "tiles": total, "rank": rank,
               "tile_bytes": 3 * SIDE * SIDE * 4, "seconds": seconds, "tokens": int(batch.tokens.numel())}
        if torch.distributed.get_rank() == 0:
            out["grads"] = grads
        if weights is None:
            out["weights"] = {n: p.detach().clone().numpy() for n, p in model.named_parameters()}
    return out


def run_cp1() -> dict:
    return _run(1, None, "whole")


def run_cp4(weights) -> dict:
    return {path: _run(CP, weights, path) for path in ("exchange", "allgather")}


def test_the_pack_is_long_with_many_images():
    b = make_pack()
    assert b.tokens.shape == (1, SEQ)
    assert b.num_images > 300 and int(b.num_tiles.sum()) > 1000 and len(b.seq_lens[0]) > 200
    assert int(b.num_tiles.sum()) % CP  # unequal shares
    assert int((b.tokens == IMG_CTX).sum()) == int(b.num_tiles.sum())  # one token per 28 px tile


@pytest.mark.slow
def test_cp4_on_a_64k_pack_holds_only_its_tiles_and_matches_cp1():
    ref = run_distributed(run_cp1, 1, timeout=300)[0]
    res = run_distributed(run_cp4, CP, ref["weights"], timeout=400)
    total = ref["tiles"]
    assert ref["encoded"] == [total] and ref["held_bytes"] == total * ref["tile_bytes"]
    for r in res:
        ex = r["exchange"]
        start, stop = tile_share(total, CP, ex["rank"])
        # Measured: the pixels this rank holds and the tiles its vision tower encodes are its share.
        assert ex["held_bytes"] == (stop - start) * ex["tile_bytes"] <= -(-total // CP) * ex["tile_bytes"]
        assert ex["encoded"] == ([stop - start] if stop > start else [])
        assert r["allgather"]["held_bytes"] == total * ex["tile_bytes"]  # the path this replaces held all
        for path in ("exchange", "allgather"):
            assert abs(r[path]["loss"] - ref["loss"]) < 1e-5 * max(1.0, abs(ref["loss"])), (path, r[path]["loss"])
    for path in ("exchange", "allgather"):
        got = res[0][path]["grads"]
        assert got.keys() == ref["grads"].keys()
        for n, g in ref["grads"].items():
            torch.testing.assert_close(torch.from_numpy(got[n]), torch.from_numpy(g), atol=2e-6, rtol=1e-4,
                                       msg=lambda m, p=path, n=n: f"{p} {n}: {m}")
    vision = [n for n in ref["grads"] if n.startswith("vision_model.")]
    assert vision and all(np.abs(ref["grads"][n]).sum() > 0 for n in vision)
    # exchange and all-gather: the same numbers to float32 rounding of the same sums
    for n in vision:
        torch.testing.assert_close(torch.from_numpy(res[0]["exchange"]["grads"][n]),
                                   torch.from_numpy(res[0]["allgather"]["grads"][n]), atol=1e-7, rtol=1e-5)
    print(f"\n64K pack, {total} tiles: cp1 fwd+bwd {ref['seconds']:.1f}s; cp4 exchange "
          f"{max(r['exchange']['seconds'] for r in res):.1f}s, per-rank pixels "
          f"{[r['exchange']['held_bytes'] for r in res]} B vs {ref['held_bytes']} B whole")
