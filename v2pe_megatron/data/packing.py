"""Greedy packing of prepared samples into fixed-length training sequences.

A pack concatenates sub-samples in arrival order until the next one would overflow ``seq_length``
tokens or ``max_tiles_per_pack`` tiles. Each sub-sample is padded to a multiple of ``pad_multiple``
(so context parallelism can cut every sub-sample into 2*CP chunks) and the tail of the pack is a
padding segment of its own, so attention never mixes padding with real tokens.

Labels are shifted here: ``labels[i] = tokens[i+1]`` inside a sub-sample and ``loss_mask[i]`` says
whether that next token is an assistant target; the last token of every sub-sample, all padding,
prompts and image tokens have mask 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from v2pe_megatron.data.skips import SampleError
from v2pe_megatron.parallel.batch import MicroBatch


@dataclass
class PreparedSample:
    """One sub-sample, ready to pack."""

    sample_id: int
    tokens: np.ndarray          # int64 [L]
    target: np.ndarray          # bool [L]
    position_ids: np.ndarray    # float64 [L]
    pixel_values: np.ndarray    # float32 [T, 3, S, S]
    num_tiles: np.ndarray       # int32 [n_images]
    deltas: np.ndarray          # float64 [n_images]
    cursor: Any = None          # the loader's position of this sample (resume)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.tokens.size)

    @property
    def tiles(self) -> int:
        return int(self.pixel_values.shape[0])


def padded_length(n: int, pad_multiple: int) -> int:
    return -(-n // pad_multiple) * pad_multiple


def safe_cut(tokens: np.ndarray, limit: int, img_start_id: int, img_end_id: int) -> int:
    """Largest length <= limit that does not end inside an image (cuts before its ``<img>``)."""
    if tokens.size <= limit:
        return int(tokens.size)
    starts = np.flatnonzero(tokens[:limit] == img_start_id)
    if starts.size:
        last = int(starts[-1])
        ends_after = np.flatnonzero(tokens[last:] == img_end_id)
        if ends_after.size == 0 or last + int(ends_after[0]) >= limit:
            return last
    return limit


def truncate_or_skip(tokens: np.ndarray, target: np.ndarray, limit: int, mode: str, *, img_start_id: int,
                     img_end_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens, target, images kept) for a sample of at most ``limit`` tokens."""
    n_img = int(np.count_nonzero(tokens == img_start_id))
    if tokens.size <= limit:
        return tokens, target, n_img
    if mode == "skip":
        raise SampleError("too_long", f"{tokens.size} tokens > {limit}")
    cut = safe_cut(tokens, limit, img_start_id, img_end_id)
    tokens, target = tokens[:cut], target[:cut]
    return tokens, target, int(np.count_nonzero(tokens == img_start_id))


def build_pack(samples: Sequence[PreparedSample], seq_length: int, *, pad_id: int, pad_multiple: int = 1,
               image_shape: tuple[int, int, int] = (3, 448, 448)) -> dict[str, Any]:
    """One training sequence (the contract's pack dict) from sub-samples that fit."""
    S = seq_length
    tokens = np.full(S, pad_id, dtype=np.int64)
    labels = np.full(S, pad_id, dtype=np.int64)
    loss_mask = np.zeros(S, dtype=np.float32)
    position_ids = np.zeros(S, dtype=np.float64)
    seq_lens: list[int] = []
    off = 0
    for s in samples:
        n = s.length
        lp = padded_length(n, pad_multiple)
        if off + lp > S:
            raise ValueError(f"sub-samples overflow the pack: {off} + {lp} > {S}")
        tokens[off: off + n] = s.tokens
        labels[off: off + n - 1] = s.tokens[1:]
        loss_mask[off: off + n - 1] = s.target[1:]
        position_ids[off: off + n] = s.position_ids
        # Padding inside a sub-sample continues its positions (it is only ever attended by itself).
        last = s.position_ids[-1] if n else -1.0
        position_ids[off + n: off + lp] = np.floor(last) + 1 + np.arange(lp - n)
        seq_lens.append(lp)
        off += lp
    if off < S:
        position_ids[off:] = np.arange(S - off)
        seq_lens.append(S - off)
    pix = [s.pixel_values for s in samples if s.pixel_values.shape[0]]
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        "seq_lens": np.asarray(seq_lens, dtype=np.int32),
        # Tiles are the bulk of a pack (2.4 MB each at 448 px): never copy a lone array again.
        "pixel_values": (pix[0] if len(pix) == 1 and pix[0].flags.writeable else np.concatenate(pix) if pix
                         else np.zeros((0, *image_shape), dtype=np.float32)),
        "num_tiles": (np.concatenate([s.num_tiles for s in samples]).astype(np.int32)
                      if samples else np.zeros(0, np.int32)),
        "sample_ids": np.asarray([s.sample_id for s in samples], dtype=np.int64),
        "deltas": (np.concatenate([s.deltas for s in samples]).astype(np.float64)
                   if samples else np.zeros(0, np.float64)),
    }


class Packer:
    """Greedy first-come packing. ``add`` returns the packs it completed; ``pending`` is the pack
    being filled (its first sample's cursor is where a resumed run restarts).

    The decisions need only each sample's ``length`` and ``tiles``; ``build`` turns a finished list
    of samples into what ``add``/``flush`` return (default: :func:`build_pack`). The loader plans
    packs from undecoded samples with ``build=list``."""

    def __init__(self, seq_length: int, *, max_tiles_per_pack: int, pad_id: int, pad_multiple: int = 1,
                 packing: bool = True, image_shape: tuple[int, int, int] = (3, 448, 448),
                 build: Callable[[list[Any]], Any] | None = None) -> None:
        if pad_multiple < 1 or seq_length % pad_multiple:
            raise ValueError(f"seq_length {seq_length} must be a multiple of pad_multiple {pad_multiple}")
        self.seq_length = seq_length
        self.max_tiles = max_tiles_per_pack
        self.pad_id = pad_id
        self.pad_multiple = pad_multiple
        self.packing = packing
        self.image_shape = image_shape
        self.build = build
        self.pending: list[PreparedSample] = []
        self._tokens = 0
        self._tiles = 0

    @property
    def token_limit(self) -> int:
        """Longest sub-sample that fits alone (padding included)."""
        return self.seq_length

    def check_fits_alone(self, s: PreparedSample) -> None:
        if padded_length(s.length, self.pad_multiple) > self.seq_length:
            raise SampleError("too_long", f"{s.length} tokens > {self.seq_length}")
        if s.tiles > self.max_tiles:
            raise SampleError("too_many_tiles", f"{s.tiles} tiles > max_tiles_per_pack={self.max_tiles}")

    def add(self, s: PreparedSample) -> list[dict[str, Any]]:
        self.check_fits_alone(s)
        out = []
        lp = padded_length(s.length, self.pad_multiple)
        if self.pending and (not self.packing or self._tokens + lp > self.seq_length
                             or self._tiles + s.tiles > self.max_tiles):
            out.append(self.flush())
        self.pending.append(s)
        self._tokens += lp
        self._tiles += s.tiles
        if not self.packing:
            out.append(self.flush())
        return out

    def flush(self) -> dict[str, Any]:
        if self.build is not None:
            done, self.pending, self._tokens, self._tiles = self.build(self.pending), [], 0, 0
            return done
        pack = build_pack(self.pending, self.seq_length, pad_id=self.pad_id, pad_multiple=self.pad_multiple,
                          image_shape=self.image_shape)
        self.pending, self._tokens, self._tiles = [], 0, 0
        return pack


def collate(packs: Sequence[dict[str, Any]]) -> MicroBatch:
    """Stack packs into a micro-batch: [B, S] tensors, tiles and per-image metadata concatenated in
    row order, ``seq_lens`` per row."""
    if not packs:
        raise ValueError("collate needs at least one pack")
    return MicroBatch(
        tokens=torch.from_numpy(np.stack([p["tokens"] for p in packs])),
        labels=torch.from_numpy(np.stack([p["labels"] for p in packs])),
        loss_mask=torch.from_numpy(np.stack([p["loss_mask"] for p in packs])),
        position_ids=torch.from_numpy(np.stack([p["position_ids"] for p in packs])),
        seq_lens=[torch.from_numpy(p["seq_lens"].astype(np.int32)) for p in packs],
        pixel_values=torch.from_numpy(packs[0]["pixel_values"] if len(packs) == 1
                                      else np.concatenate([p["pixel_values"] for p in packs])),
        num_tiles=torch.from_numpy(np.concatenate([p["num_tiles"] for p in packs]).astype(np.int32)),
        deltas=torch.from_numpy(np.concatenate([p["deltas"] for p in packs]).astype(np.float64)),
        sample_ids=[p["sample_ids"] for p in packs],
    )
