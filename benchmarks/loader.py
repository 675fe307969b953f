"""Tiles per second of the DALI tiling pipeline vs InternVL's own approach, and loader vs step time.

InternVL's approach (its ``dynamic_preprocess`` + ``build_transform``): Pillow decode, one bicubic
resize to the grid, one ``crop`` per tile plus the thumbnail, then per tile ToTensor + Normalize.
torchvision does not install next to this torch, so ToTensor/Normalize are written in torch exactly
as torchvision does them (permute HWC->CHW, /255, sub mean, div std). The per-tile
``T.Resize((448, 448))`` of InternVL is left out faithfully: torchvision's ``F.resize`` returns its
input unchanged when the size already matches, before any Pillow call (no copy), and
``dynamic_preprocess``'s ``image.resize(size)`` without a filter is Pillow's default, BICUBIC. Both sides get the same encoded images and the same number of threads (a thread pool for
Pillow, whose decode/resize release the GIL; DALI's own worker threads).

    .venv/bin/python benchmarks/loader.py [--threads 1 2] [--batch 8 16 32] [--repeat 3] [--results PATH]

Appends a "Data loader" section to benchmarks/RESULTS.md (``--results ''`` to skip).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from v2pe_megatron.data.tiling import (  # noqa: E402
    IMAGENET_MEAN, IMAGENET_STD, DaliTiler, choose_grid, cuda_available, image_size_of, tiles_for)

S = 448


def photos(max_side: int = 1600) -> list[bytes]:
    """skimage's sample photographs as JPEG, at their own size and upscaled to typical dataset sizes
    (InternVL's training images are mostly 500-1600 px), so grids range from 1x1 to 12 tiles."""
    from PIL import Image
    from skimage import data

    arrays = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry(),
              np.stack([data.camera()] * 3, -1), data.hubble_deep_field()]
    out = []
    for a in arrays:
        im = Image.fromarray(a)
        for scale in (1.0, 2.0, 3.0):
            w, h = int(im.width * scale), int(im.height * scale)
            if max(w, h) > max_side and scale > 1:
                continue
            buf = io.BytesIO()
            im.resize((w, h), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def internvl_one(data: bytes, max_num: int):
    """InternVL's path for one image: decode, dynamic_preprocess, ToTensor + Normalize per tile."""
    import torch
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    cols, rows = choose_grid(img.width, img.height, min_num=1, max_num=max_num, image_size=S)
    resized = img.resize((S * cols, S * rows), Image.Resampling.BICUBIC)
    tiles = [resized.crop(((i % cols) * S, (i // cols) * S, (i % cols + 1) * S, (i // cols + 1) * S))
             for i in range(cols * rows)]
    if len(tiles) != 1:
        tiles.append(img.resize((S, S), Image.Resampling.BICUBIC))
    out = []
    for t in tiles:
        # torchvision F.to_tensor: np.array(pic, copy=True) -> permute -> contiguous -> float / 255
        x = torch.from_numpy(np.array(t, np.uint8, copy=True)).permute(2, 0, 1).contiguous().float().div(255)
        # torchvision F.normalize (inplace=False): clone, then sub_(mean).div_(std)
        mean = torch.as_tensor(IMAGENET_MEAN, dtype=x.dtype).view(-1, 1, 1)
        std = torch.as_tensor(IMAGENET_STD, dtype=x.dtype).view(-1, 1, 1)
        out.append(x.clone().sub_(mean).div_(std))
    return torch.stack(out)


class InternVLRunner:
    """InternVL's path over all images with a pool of ``threads`` threads."""

    def __init__(self, threads: int, max_num: int) -> None:
        import torch

        torch.set_num_threads(1)
        self.pool = ThreadPoolExecutor(threads)
        self.max_num = max_num

    def __call__(self, images: list[bytes]) -> int:
        return sum(r.shape[0] for r in self.pool.map(lambda b: internvl_one(b, self.max_num), images))


class DaliRunner:
    def __init__(self, threads: int, batch: int, max_num: int, device: str = "cpu") -> None:
        self.tiler = DaliTiler(S, num_threads=threads, max_batch=batch, device=device)
        self.max_num = max_num

    def __call__(self, images: list[bytes]) -> int:
        # the header parse that picks each grid is part of the pipeline's cost
        grids = [choose_grid(*image_size_of(b), min_num=1, max_num=self.max_num, image_size=S) for b in images]
        return sum(r.shape[0] for r in self.tiler(images, grids))


def best_rates(runners: dict, images: list[bytes], repeat: int) -> dict[str, float]:
    """Tiles/s per runner, best of ``repeat``; the runners take turns within each round so that load
    from other jobs on a shared machine hits all of them alike."""
    for r in runners.values():
        r(images[:4])  # build + warm-up
    best = {k: float("inf") for k in runners}
    tiles = {}
    for _ in range(repeat):
        for k, r in runners.items():
            t0 = time.perf_counter()
            tiles[k] = r(images)
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: tiles[k] / best[k] for k in runners}


def stage_breakdown(images: list[bytes], threads: int, batch: int, max_num: int, repeat: int) -> list[str]:
    """Seconds for decode / grid resize / thumbnail resize alone, DALI vs Pillow, same threads: where the
    time of the two approaches goes."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from PIL import Image

    grids = [choose_grid(*image_size_of(b), min_num=1, max_num=max_num, image_size=S) for b in images]

    def dali(stage: str) -> float:
        @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, prefetch_queue_depth=1,
                      exec_dynamic=True)
        def pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            hw = fn.external_source(name="hw", dtype=types.FLOAT, ndim=1)
            img = fn.decoders.image(enc, device="cpu", output_type=types.RGB, adjust_orientation=False)
            size = hw if stage == "grid resize" else [S, S]
            out = img if stage == "decode" else fn.resize(img, size=size, interp_type=types.INTERP_CUBIC,
                                                            antialias=True)
            return out, hw

        p = pipe()
        p.build()
        best = float("inf")
        for k in range(repeat + 1):
            t0 = time.perf_counter()
            for lo in range(0, len(images), batch):
                p.feed_input("enc", [np.frombuffer(b, np.uint8) for b in images[lo: lo + batch]])
                p.feed_input("hw", [np.array([r * S, c * S], np.float32) for c, r in grids[lo: lo + batch]])
                p.run()
            if k:
                best = min(best, time.perf_counter() - t0)
        return best

    def pil_one(b: bytes, stage: str):
        im = Image.open(io.BytesIO(b)).convert("RGB")
        if stage == "grid resize":
            c, r = choose_grid(im.width, im.height, min_num=1, max_num=max_num, image_size=S)
            return im.resize((c * S, r * S), Image.Resampling.BICUBIC)
        if stage == "thumbnail resize":
            return im.resize((S, S), Image.Resampling.BICUBIC)
        return im

    def pil(stage: str) -> float:
        best = float("inf")
        with ThreadPoolExecutor(threads) as pool:
            for k in range(repeat + 1):
                t0 = time.perf_counter()
                list(pool.map(lambda b: pil_one(b, stage), images))
                if k:
                    best = min(best, time.perf_counter() - t0)
        return best

    rows = []
    dec_d, dec_p = dali("decode"), pil("decode")
    rows.append(f"| decode | {dec_d * 1e3:.0f} | {dec_p * 1e3:.0f} |")
    for stage in ("grid resize", "thumbnail resize"):  # decode included in both, then subtracted
        d, p = dali(stage) - dec_d, pil(stage) - dec_p
        rows.append(f"| {stage} (decode subtracted) | {d * 1e3:.0f} | {p * 1e3:.0f} |")
    return rows


def bench_loader(seconds: float = 20.0) -> list[str]:
    """Loader throughput on an InternVL2-2B-shaped recipe (448 px, 256 tokens/tile, max 12 tiles) on
    synthetic data with photos, against the training step it would feed (estimated, see text)."""
    import tempfile

    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.data.loader import build_train_loader
    from v2pe_megatron.data.synthetic import write_synthetic
    from v2pe_megatron.data.tokenizer import SPECIAL_TOKENS, SentencePieceTokenizer, tiny_tokenizer

    lines = []
    with tempfile.TemporaryDirectory() as d:
        meta = write_synthetic(d, 200, seed=0, min_side=300, max_side=1400, haystack_words=1500, max_images=4)
        for seq, threads in ((32768, 2),):
            r = load_recipe(None, [f"data.meta_path={meta}", f"data.seq_length={seq}", f"data.num_workers={threads}",
                                   "data.dali_device=cpu", "data.max_tiles_per_pack=256", "v2pe.policy=random"])
            tiny = tiny_tokenizer()
            # The 2B layout: the tiny sentencepiece text model with InternVL2's special-token ids.
            tok = SentencePieceTokenizer(tiny.sp, {t: 92542 + i for i, t in enumerate(SPECIAL_TOKENS)})
            loader = build_train_loader(r, dp_rank=0, dp_size=1, tokenizer=tok, prefetch=0)
            next(loader)
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds:
                next(loader)
                n += 1
            dt = (time.perf_counter() - t0) / n
            st = loader.stats
            tiles_per_pack = st["tiles"] / max(1, st["packs"])
            # 6*N FLOPs/token (N = 2.2e9 for InternVL2-2B) + attention 6*L*h*s, at 40% of an H100's
            # 989 dense bf16 TFLOP/s: the fastest step this pack would feed, on one GPU.
            flops = 6 * 2.2e9 * seq + 6 * 24 * 2048 * seq * seq
            step = flops / (0.4 * 989e12)
            lines.append(f"| InternVL2-2B-shaped, seq {seq}, {threads} DALI threads (CPU) | {dt * 1e3:.0f} ms/pack "
                         f"({tiles_per_pack:.0f} tiles/pack) | ~{step * 1e3:.0f} ms/step (1 H100, 40% MFU, est.) |")
            loader.close()
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--max-num", type=int, default=12)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--loader-seconds", type=float, default=20.0)
    p.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = p.parse_args(argv)

    images = photos()
    grids = [choose_grid(*image_size_of(b), min_num=1, max_num=args.max_num, image_size=S) for b in images]
    tiles = sum(tiles_for(g, True) for g in grids)
    print(f"{len(images)} JPEG photos (skimage, 1x-3x), {tiles} tiles of {S}px at max {args.max_num} tiles")
    rows = []
    base_name = "InternVL (Pillow resize + crops + ToTensor/Normalize in torch), {} thread(s)"
    for th in args.threads:
        runners: dict = {base_name.format(th): InternVLRunner(th, args.max_num)}
        for b in args.batch:
            runners[f"DALI CPU tiling pipeline, {th} thread(s), batch {b}"] = DaliRunner(th, b, args.max_num)
        if cuda_available():
            b = args.batch[-1]
            runners[f"DALI mixed (GPU) decode + GPU tiling, {th} thread(s), batch {b}"] = DaliRunner(
                th, b, args.max_num, device="gpu")
        rates = best_rates(runners, images, args.repeat)
        base = rates[base_name.format(th)]
        for name, v in rates.items():
            rows.append((name, v, v / base))
            print(f"{name}: {v:.1f} tiles/s ({v / base:.2f}x)", flush=True)
    th, b = max(args.threads), max(args.batch)
    stage_rows = stage_breakdown(images, th, b, args.max_num, args.repeat)
    for ln in stage_rows:
        print(ln, flush=True)
    loader_rows = bench_loader(args.loader_seconds) if args.loader_seconds > 0 else []
    for ln in loader_rows:
        print(ln)

    if args.results:
        cpu = platform.processor() or platform.machine()
        text = ["", "## Data loader", "",
                "`" + " ".join([".venv/bin/python benchmarks/loader.py",
                                *(argv if argv is not None else sys.argv[1:])]) + "`",
                "",
                f"Machine: {os.cpu_count()} CPU cores ({cpu}), CUDA: {cuda_available()}. Images: {len(images)} JPEG "
                f"photographs from scikit-image at 1x-3x scale, {tiles} tiles of {S} px (max {args.max_num} tiles "
                f"+ thumbnail). Tiles/s = tiles out (normalised float32 [T,3,448,448]) / wall time, best of "
                f"{args.repeat}. Baseline = InternVL's own path with torchvision's ToTensor/Normalize written in "
                f"torch (torchvision is not installable next to this torch); same thread count on both sides.",
                "", "| pipeline | tiles/s | vs InternVL |", "|---|---:|---:|"]
        text += [f"| {name} | {v:.1f} | {x:.2f}x |" for name, v, x in rows]
        text += ["", f"Where the time goes ({th} threads, DALI batch {b}; ms for all {len(images)} images):", "",
                 "| stage | DALI CPU | Pillow |", "|---|---:|---:|", *stage_rows]
        if loader_rows:
            text += ["", "Loader vs the step it feeds (whole loader: read, tokenize, tile, pack, V2PE positions):",
                     "", "| setting | loader | training step |", "|---|---:|---:|", *loader_rows]
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a") as f:
            f.write("\n".join(text) + "\n")
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
