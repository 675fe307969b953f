"""A tiny language model and synthetic batches, shared by the parity tests and the demo.

Everything runs inside a rank that already has megatron's model-parallel state (see
``runtime.distributed.model_parallel``).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from megatron.core import parallel_state as ps

from v2pe_megatron.config import Recipe, load_recipe
from v2pe_megatron.model import language
from v2pe_megatron.parallel.layout import Layout, resolve_spec
from v2pe_megatron.runtime.distributed import device
from v2pe_megatron.training.engine import masked_loss_func


def tiny_recipe(*overrides: str) -> Recipe:
    base = ["model.preset=tiny", "data.seq_length=32", "optimizer.clip_grad=0", "optimizer.weight_decay=0"]
    return load_recipe(None, base + list(overrides))


def layout_of(recipe: Recipe) -> Layout:
    """The recipe's layout on the current process group, its spec resolved on this machine."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else None
    return Layout.from_config(recipe.parallel, world_size=world,
                              spec=resolve_spec(recipe.model.spec, recipe.model.dtype))


def build_language_model(recipe: Recipe) -> language.LanguageModel:
    """The recipe's LLM alone, for this rank's pipeline stage (the model API's own builder)."""
    model = language.build_language_model(recipe.model.language, layout_of(recipe), dtype=recipe.model.dtype,
                                          recompute=recipe.train.recompute,
                                          pre_process=ps.is_pipeline_first_stage(ignore_virtual=True),
                                          post_process=ps.is_pipeline_last_stage(ignore_virtual=True))
    return model.to(device())


def synthetic_lm_batches(num: int, *, micro_batch_size: int, seq_length: int, vocab_size: int,
                         seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``num`` micro-batches of random tokens with next-token labels, a partial loss mask and
    fractional (V2PE-like) positions, so that every code path that sees positions is exercised."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        toks = torch.randint(0, vocab_size, (micro_batch_size, seq_length + 1), generator=g)
        mask = (torch.rand(micro_batch_size, seq_length, generator=g) > 0.25).float()
        steps = torch.where(torch.rand(micro_batch_size, seq_length, generator=g) > 0.5, 1.0, 0.25)
        pos = (torch.cumsum(steps.double(), dim=1) - steps.double())
        out.append({"tokens": toks[:, :-1], "labels": toks[:, 1:], "loss_mask": mask, "position_ids": pos})
    return out


def shard_for_data_parallel(batches: list[dict], dp_rank: int, dp_size: int) -> list[dict]:
    """The global batch is ``batches`` (micro-batches in order); rank r takes every dp_size-th."""
    return batches[dp_rank::dp_size]


def lm_forward_step(data_iterator: Iterator[dict], model):
    batch = next(data_iterator)
    dev = next(model.parameters()).device
    out = model(batch["tokens"].to(dev), batch["position_ids"].to(dev), labels=batch["labels"].to(dev))
    return out, masked_loss_func(batch["loss_mask"].to(dev))


# The tiny preset's image token ids and LLM tokens per 56 px tile ((56/14)^2 * 0.5^2).
IMG_START, IMG_END, IMG_CTX = 5, 6, 7
TOKENS_PER_TILE = 4


def synthetic_packs(num: int, *, rows: int, seq_length: int, pad_multiple: int, seed: int = 5) -> list:
    """``num`` collated micro-batches of ``rows`` packs each, made by the real packer
    (``data.packing``) for the tiny preset: text-only sub-samples and sub-samples with a 1-2 tile
    image, V2PE deltas < 1 (fractional positions restarting per sub-sample), sub-samples padded to
    ``pad_multiple`` and a padding tail in most rows."""
    from v2pe_megatron.data.packing import PreparedSample, build_pack, collate
    from v2pe_megatron.v2pe import compute_position_ids

    rng = np.random.default_rng(seed)
    batches, sid = [], 0
    for _ in range(num):
        packs = []
        for _ in range(rows):
            samples, used = [], 0
            while True:
                n_text = int(rng.integers(5, 30))
                toks = list(rng.integers(10, 500, n_text))
                deltas, tiles = [], 0
                if rng.random() < 0.6:  # an image of 1-2 tiles somewhere inside
                    at = int(rng.integers(1, n_text))
                    tiles = int(rng.integers(1, 3))
                    toks[at:at] = [IMG_START] + [IMG_CTX] * (TOKENS_PER_TILE * tiles) + [IMG_END]
                    deltas = [float(rng.choice([1.0, 0.5, 0.25, 1 / 16]))]
                toks = np.asarray(toks, dtype=np.int64)
                lp = -(-toks.size // pad_multiple) * pad_multiple
                if used + lp > seq_length - pad_multiple:  # leave a padding tail segment in most rows
                    break
                pos = compute_position_ids(toks, img_start_id=IMG_START, img_end_id=IMG_END,
                                           img_context_id=IMG_CTX, delta=deltas if deltas else 1.0)
                target = rng.random(toks.size) > 0.3
                pixels = rng.standard_normal((tiles, 3, 56, 56)).astype(np.float32)
                samples.append(PreparedSample(sid, toks, target, pos, pixels, np.full(len(deltas), tiles, np.int32),
                                              np.asarray(deltas)))
                sid += 1
                used += lp
            packs.append(build_pack(samples, seq_length, pad_id=0, pad_multiple=pad_multiple,
                                    image_shape=(3, 56, 56)))
        batches.append(collate(packs))
    return batches


def image_pack(seq_length: int, *, pad_multiple: int, side: int, tokens_per_tile: int, seed: int = 11):
    """One collated [1, seq_length] pack of many short sub-samples (~60-300 text tokens, most with 1-3
    images of 1-6 tiles), built by ``data.packing``, without pixels (``pixel_values`` empty): the
    pixels of tile i are :func:`tile_pixels`, a function of i alone, so a context-parallel rank can
    make only its own share."""
    from v2pe_megatron.data.packing import PreparedSample, build_pack, collate
    from v2pe_megatron.v2pe import compute_position_ids

    rng = np.random.default_rng(seed)
    samples, used, sid = [], 0, 0
    while True:
        toks: list[int] = list(rng.integers(10, 500, int(rng.integers(60, 300))))
        tiles = [int(t) for t in rng.integers(1, 7, int(rng.integers(0, 4)))]
        deltas = [float(rng.choice([1.0, 0.5, 1 / 16, 1 / 256])) for _ in tiles]
        # Insert from the last place backwards so earlier places stay in the text, outside any image.
        for at, t in zip(sorted(rng.choice(np.arange(1, len(toks)), len(tiles), replace=False))[::-1], tiles[::-1]):
            toks[at:at] = [IMG_START] + [IMG_CTX] * (t * tokens_per_tile) + [IMG_END]
        ids = np.asarray(toks, dtype=np.int64)
        lp = -(-ids.size // pad_multiple) * pad_multiple
        if used + lp > seq_length - pad_multiple:
            break
        pos = compute_position_ids(ids, img_start_id=IMG_START, img_end_id=IMG_END, img_context_id=IMG_CTX,
                                   delta=deltas if deltas else 1.0)
        samples.append(PreparedSample(sid, ids, rng.random(ids.size) > 0.3, pos, np.zeros((0, 3, side, side), np.float32),
                                      np.asarray(tiles, np.int32), np.asarray(deltas)))
        sid, used = sid + 1, used + lp
    return collate([build_pack(samples, seq_length, pad_id=0, pad_multiple=pad_multiple, image_shape=(3, side, side))])


def tile_pixels(start: int, stop: int, side: int) -> torch.Tensor:
    """float32 [stop - start, 3, side, side]: the pixels of tiles [start, stop) of an :func:`image_pack`."""
    out = torch.empty((stop - start, 3, side, side))
    for i in range(start, stop):
        out[i - start] = torch.randn((3, side, side), generator=torch.Generator().manual_seed(1000 + i))
    return out
