"""Pixels per context-parallel rank, before (every rank holds all of a pack's tiles and all-gathers
the features) and after (each rank holds its tile share; the features travel by all-to-all).

Two measurements:

1. The model step: the tiny InternVL (``--side`` px tiles) on one ``--seq``-token pack of many short
   sub-samples with many images (``testing.tiny.image_pack``), CP=``--cp`` gloo ranks, one
   forward+backward per path. Per rank: the bytes of pixel values held, the tiles its vision tower
   encodes, the feature rows it receives, and the resident-memory peak of the step (VmHWM reset via
   /proc/self/clear_refs, minus the resident size before the pixels are made).
2. The data loader: the tiny recipe's synthetic data, ``--loader-seq``-token packs, the first
   ``--loader-batches`` micro-batches, pixel bytes per CP rank with and without ``cp_size``.

Then the same arithmetic at InternVL2-2B scale: 448 px float32 tiles (2.4 MB each), the tile count
of a 1M-token pack (``--tiles-1m``), per rank before/after for the CP sizes of the 1M recipes.

    .venv/bin/python benchmarks/cp_images.py [--seq 65536] [--cp 4] [--side 56]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import release_memory, reset_peak, status_kib  # noqa: E402



def bench_rank(seq: int, side: int) -> dict:
    from megatron.core import parallel_state as ps

    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.cp_split import image_feature_index, tile_share, zigzag_index_map
    from v2pe_megatron.parallel.packed_seq import split_batch_for_cp
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing.tiny import IMG_CTX, image_pack, layout_of, tile_pixels

    torch.set_num_threads(1)
    try:  # large blocks via mmap: freed tensors leave the resident set at once
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)
    except OSError:
        pass
    cp = torch.distributed.get_world_size()
    recipe = load_recipe(None, ["model.preset=tiny", f"data.seq_length={seq}", f"model.vision.image_size={side}",
                                "model.vision.num_layers=1", "model.language.num_layers=2",
                                f"model.language.max_position_embeddings={seq}", f"parallel.cp={cp}"])
    per_tile = recipe.model.num_image_token
    out = {}
    with model_parallel(cp=cp, seed=3):
        model = build_model(recipe.model, layout_of(recipe))
        encoded: list[int] = []
        model.vision_model.register_forward_hook(lambda m, a, o: encoded.append(int(a[0].shape[0])))
        rank = ps.get_context_parallel_rank()
        pack = image_pack(seq, pad_multiple=2 * cp, side=side, tokens_per_tile=per_tile)
        total = int(pack.num_tiles.sum())
        for path in ("allgather", "exchange", "allgather", "exchange"):  # the first pair warms up
            encoded.clear()
            model.zero_grad(set_to_none=True)
            release_memory()
            torch.distributed.barrier()
            base = status_kib("VmRSS")
            reset_peak()
            t0 = time.perf_counter()
            if path == "exchange":
                start, stop = tile_share(total, cp, rank)
                batch = pack.replace(pixel_values=tile_pixels(start, stop, side), tile_range=(start, stop))
                b = split_batch_for_cp(batch, cp_size=cp, cp_rank=rank, img_context_id=IMG_CTX)
                idx = None
            else:
                batch = pack.replace(pixel_values=tile_pixels(0, total, side))
                b = split_batch_for_cp(batch, cp_size=cp, cp_rank=rank)
                idx = image_feature_index(pack.tokens, [zigzag_index_map(r.tolist(), cp, rank) for r in pack.seq_lens],
                                          IMG_CTX)
            held = int(batch.pixel_values.nbytes)
            loss = model(b.tokens, b.position_ids, b.pixel_values, labels=b.labels,
                         packed_seq_params=b.packed_seq_params, image_feature_index=idx,
                         image_exchange=b.image_exchange)
            (loss * b.loss_mask).sum().backward()
            seconds = time.perf_counter() - t0
            peak = (status_kib("VmHWM") - base) / 1024
            received = int((b.tokens == IMG_CTX).sum())
            del batch, b, loss
            torch.distributed.barrier()
            out[path] = {"held": held, "encoded": sum(encoded), "received": received, "peak_mib": peak,
                         "seconds": seconds, "rank": rank, "tiles": total, "images": pack.num_images}
    return out


def loader_bytes(seq: int, cp: int, batches: int) -> dict:
    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.data.loader import build_train_loader

    r = load_recipe(None, ["model.preset=tiny", f"data.seq_length={seq}", "data.max_dynamic_patch=6",
                           "data.micro_batch_size=1", "data.global_batch_size=1", "data.max_tiles_per_pack=4096",
                           "data.synthetic_num_samples=400", "data.dali_device=cpu", f"parallel.cp={cp}"])

    def held(cp_rank: int, cp_size: int) -> list[int]:
        ld = build_train_loader(r, dp_rank=0, dp_size=1, prefetch=0, cp_rank=cp_rank, cp_size=cp_size)
        out = [int(next(ld).pixel_values.nbytes) for _ in range(batches)]
        ld.close()
        return out

    return {"whole": held(0, 1), "ranks": [held(k, cp) for k in range(cp)]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=65536)
    ap.add_argument("--cp", type=int, default=4)
    ap.add_argument("--side", type=int, default=56, help="tile side in pixels (tiny preset: 56)")
    ap.add_argument("--loader-seq", type=int, default=16384)
    ap.add_argument("--loader-batches", type=int, default=2)
    ap.add_argument("--tiles-1m", type=int, default=4096, help="tiles of a 1M-token pack at 448 px")
    args = ap.parse_args(argv)
    from v2pe_megatron.testing.distributed import run_distributed

    t0 = time.perf_counter()
    res = run_distributed(bench_rank, args.cp, args.seq, args.side, timeout=1800)
    r0 = res[0]["exchange"]
    print(f"tiny InternVL (vision 1 layer, LLM 2 layers, {args.side} px tiles), one {args.seq}-token pack: "
          f"{r0['images']} images, {r0['tiles']} tiles; CP={args.cp} gloo ranks, one forward+backward per path "
          f"({time.perf_counter() - t0:.0f} s wall)")
    print("| rank | pixels held before (B) | after (B) | tiles encoded before | after | feature rows received "
          "| step peak before (MiB) | after (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res:
        a, e = r["allgather"], r["exchange"]
        print(f"| {e['rank']} | {a['held']} | {e['held']} | {a['encoded']} | {e['encoded']} | {e['received']} "
              f"| {a['peak_mib']:.1f} | {e['peak_mib']:.1f} |")
    whole = sum(r["exchange"]["held"] for r in res)
    print(f"after: the ranks' shares add up to the whole pack's pixels ({whole} B = "
          f"{res[0]['allgather']['held']} B): {whole == res[0]['allgather']['held']}")

    ld = loader_bytes(args.loader_seq, args.cp, args.loader_batches)
    print(f"\ndata loader, tiny recipe synthetic data, {args.loader_seq}-token packs, first {args.loader_batches} "
          f"micro-batches: pixel bytes per CP rank")
    print("| micro-batch | without CP sharding | " + " | ".join(f"CP rank {k}" for k in range(args.cp)) + " |")
    print("|---|---|" + "---|" * args.cp)
    for i, w in enumerate(ld["whole"]):
        print(f"| {i} | {w} | " + " | ".join(str(ld['ranks'][k][i]) for k in range(args.cp)) + " |")

    tile = 3 * 448 * 448 * 4
    print(f"\nInternVL2-2B scale (arithmetic, float32 448 px tiles = {tile / 2**20:.2f} MiB): a 1M-token pack of "
          f"{args.tiles_1m} tiles")
    print("| CP | pixels per rank before (GiB) | after (GiB) |")
    print("|---|---|---|")
    for cp in (8, 16, 32):
        print(f"| {cp} | {args.tiles_1m * tile / 2**30:.2f} | {-(-args.tiles_1m // cp) * tile / 2**30:.2f} |")


if __name__ == "__main__":
    main()
