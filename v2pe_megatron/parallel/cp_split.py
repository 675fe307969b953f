"""Context-parallel index map for packed sequences.

Megatron's load-balanced ("zigzag") split cuts a sequence into 2*cp chunks and gives rank r chunks
r and 2*cp-1-r, so that every rank holds as much early (cheap) as late (expensive) causal work. For
a pack of several sub-samples the split must happen per sub-sample (the reference cut the whole
pack, which is only right for a single sequence): this is Transformer Engine's THD layout
(``thd_get_partitioned_indices``) and what megatron's unfused THD rotary path assumes.

Tokens, labels, loss masks and V2PE position ids must all be sliced with the same map; a pure numpy
function of the padded lengths, it needs no process group. The image features follow the tokens:
:func:`image_feature_index` says which of a pack's features a rank's ``<IMG_CONTEXT>`` tokens take.

Tiles are split too, by a second rule, :func:`tile_share`: the micro-batch's tiles (all rows, in row
order) are cut into ``cp`` contiguous shares of ``ceil(T / cp)`` (the last ones shorter, possibly
empty), and each rank decodes and encodes only its own share. A tile's features are needed by the
ranks holding its ``<IMG_CONTEXT>`` tokens; :func:`image_exchange` turns the two rules into the
per-pair counts of one all-to-all (:mod:`v2pe_megatron.model.vision_cp`). Both are pure functions of
the whole pack's tokens, which every CP rank has, so every rank computes the same plan without
communicating.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from v2pe_megatron.parallel.layout import check_multiple, seq_multiple

__all__ = ["zigzag_index_map", "zigzag_owner", "split_for_cp", "cp_local_seq_lens", "image_feature_index",
           "tile_share", "ImageExchange", "image_exchange"]


def _check_lengths(seq_lens_padded: Sequence[int], cp_size: int) -> np.ndarray:
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    lens = np.asarray(list(seq_lens_padded), dtype=np.int64)
    if lens.ndim != 1:
        raise ValueError(f"seq_lens_padded must be a flat list of lengths, got shape {lens.shape}")
    if (lens < 0).any():
        raise ValueError(f"sub-sample lengths must be >= 0, got {lens.tolist()}")
    check_multiple(lens.tolist(), seq_multiple(cp_size))
    return lens


def zigzag_index_map(seq_lens_padded: Sequence[int], cp_size: int, cp_rank: int) -> np.ndarray:
    """int64 indices (into the packed sequence) of the tokens CP rank ``cp_rank`` keeps.

    Each sub-sample (lengths in pack order, each a multiple of 2*cp) is cut into 2*cp equal
    chunks; the rank keeps chunks ``cp_rank`` and ``2*cp-1-cp_rank`` of every sub-sample, and the
    result lists them sub-sample after sub-sample, in increasing order within each.
    """
    lens = _check_lengths(seq_lens_padded, cp_size)
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}), got {cp_rank}")
    if cp_size == 1:
        return np.arange(int(lens.sum()), dtype=np.int64)
    chunk = lens // (2 * cp_size)
    starts = np.concatenate(([0], np.cumsum(lens)[:-1])) if lens.size else lens
    # Per sub-sample: [front chunk, back chunk], each `chunk` tokens long.
    first = starts + cp_rank * chunk
    second = starts + (2 * cp_size - 1 - cp_rank) * chunk
    seg_starts = np.stack([first, second], axis=1).ravel()
    seg_lens = np.repeat(chunk, 2)
    total = int(seg_lens.sum())
    # Vectorized concatenation of ranges: offset of each token inside its segment + segment start.
    seg_offsets = np.cumsum(seg_lens) - seg_lens
    return np.repeat(seg_starts - seg_offsets, seg_lens) + np.arange(total, dtype=np.int64)


def split_for_cp(x: torch.Tensor, index: np.ndarray | torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` restricted to the tokens of ``index`` along ``dim`` (tokens, labels, positions alike)."""
    if isinstance(index, np.ndarray):
        index = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
    return x.index_select(dim, index.to(device=x.device, dtype=torch.long))


def cp_local_seq_lens(seq_lens_padded: Sequence[int], cp_size: int) -> list[int]:
    """Lengths of the sub-samples as held by one CP rank (each padded length / cp)."""
    lens = _check_lengths(seq_lens_padded, cp_size)
    return (lens // cp_size).tolist()


def image_feature_index(tokens: Tensor, index_maps: list[np.ndarray | Tensor], img_context_id: int) -> Tensor:
    """Which rows of the micro-batch's flattened image features ([T * n, h], row-major order of the
    whole batch's ``<IMG_CONTEXT>`` tokens) belong to this rank's local ``<IMG_CONTEXT>`` tokens,
    in the local row-major order (the order ``InternVLModel.merge`` scatters them in).

    ``tokens`` [B, S] is the whole batch; ``index_maps`` one zigzag map per row (or one map over the
    flattened [1, B*S] batch for thd).
    """
    if len(index_maps) == 1 and tokens.shape[0] > 1:
        tokens = tokens.reshape(1, -1)
    ctx = tokens == img_context_id
    ordinal = (torch.cumsum(ctx.reshape(-1).long(), 0) - 1).reshape(ctx.shape)
    picked = []
    for row, m in enumerate(index_maps):
        m = torch.as_tensor(m, dtype=torch.long)
        picked.append(ordinal[row, m][ctx[row, m]])
    return torch.cat(picked) if picked else torch.zeros(0, dtype=torch.long)


def zigzag_owner(seq_lens_padded: Sequence[int], cp_size: int) -> np.ndarray:
    """int64 [sum(lens)]: the CP rank that holds each token of the pack (the inverse of
    :func:`zigzag_index_map` over all ranks, built from it so the split stays one rule)."""
    lens = _check_lengths(seq_lens_padded, cp_size)
    owner = np.zeros(int(lens.sum()), dtype=np.int64)
    for r in range(1, cp_size):
        owner[zigzag_index_map(lens, cp_size, r)] = r
    return owner


def tile_share(num_tiles: int, cp_size: int, cp_rank: int) -> tuple[int, int]:
    """[start, stop) of the micro-batch's tiles CP rank ``cp_rank`` decodes and encodes: contiguous
    shares of ``ceil(num_tiles / cp_size)``; the last shares are shorter or empty."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} not in [0, cp_size={cp_size})")
    if num_tiles < 0:
        raise ValueError(f"num_tiles must be >= 0, got {num_tiles}")
    per = -(-num_tiles // cp_size)
    start = min(cp_rank * per, num_tiles)
    return start, min(start + per, num_tiles)


@dataclass(frozen=True)
class ImageExchange:
    """One CP rank's part of the image-feature all-to-all.

    Feature rows are the flattened [tiles * tokens_per_tile, h] features of the rank's tile share.
    ``send_rows`` (long) lists the local rows to send, grouped by destination rank (``send_counts``
    per rank, this rank included); the rows received (``recv_counts`` per source rank), concatenated
    in rank order, are exactly this rank's ``<IMG_CONTEXT>`` tokens' features in local row-major order
    (the order ``InternVLModel.merge`` scatters them in).
    """

    tile_range: tuple[int, int]   # this rank's tiles of the micro-batch (see tile_share)
    tokens_per_tile: int
    send_rows: Tensor
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]

    @property
    def num_recv(self) -> int:
        return sum(self.recv_counts)

    def to(self, device) -> "ImageExchange":
        return dataclasses.replace(self, send_rows=self.send_rows.to(device))


def image_exchange(tokens: Tensor, seq_lens_padded: Sequence[int], img_context_id: int, num_tiles: int,
                   cp_size: int, cp_rank: int) -> ImageExchange:
    """The all-to-all plan of CP rank ``cp_rank`` for a micro-batch of ``num_tiles`` tiles.

    ``tokens`` is the whole micro-batch ([B, S], rows in order), ``seq_lens_padded`` the sub-sample
    lengths of all rows concatenated (the flattened pack: the zigzag split of each sub-sample does not
    depend on which row it sits in). Feature row g (the g-th ``<IMG_CONTEXT>`` token in row-major
    order) comes from tile ``g // tokens_per_tile``, encoded by the rank whose :func:`tile_share`
    holds that tile, and goes to the rank :func:`zigzag_owner` gives its token.
    """
    flat = tokens.reshape(-1)
    ctx = np.flatnonzero((flat == img_context_id).cpu().numpy())
    n_ctx = ctx.size
    if num_tiles == 0 or n_ctx == 0:
        if n_ctx or num_tiles:
            raise ValueError(f"{n_ctx} <IMG_CONTEXT> tokens (id {img_context_id}) but {num_tiles} tiles")
    elif n_ctx % num_tiles:
        raise ValueError(f"{n_ctx} <IMG_CONTEXT> tokens (id {img_context_id}) do not split evenly over "
                         f"{num_tiles} tiles: the tokens and tiles of the micro-batch disagree")
    per_tile = n_ctx // num_tiles if num_tiles else 0
    owner = zigzag_owner(seq_lens_padded, cp_size)
    if owner.size != flat.numel():
        raise ValueError(f"seq_lens cover {owner.size} tokens, the micro-batch holds {flat.numel()}")
    dest = owner[ctx]                                          # [n_ctx]: who needs feature row g
    stops = np.asarray([tile_share(num_tiles, cp_size, r)[1] for r in range(cp_size)])
    # [n_ctx]: who encodes row g: the first rank whose share ends after its tile.
    src = np.searchsorted(stops, np.arange(n_ctx) // max(per_tile, 1), side="right")
    start, stop = tile_share(num_tiles, cp_size, cp_rank)
    mine = np.flatnonzero(src == cp_rank)                      # ascending g
    # Stable sort by destination keeps each destination's rows ascending, i.e. in its local order.
    order = mine[np.argsort(dest[mine], kind="stable")]
    send_counts = np.bincount(dest[mine], minlength=cp_size)
    recv_counts = np.bincount(src[dest == cp_rank], minlength=cp_size)
    return ImageExchange(tile_range=(start, stop), tokens_per_tile=per_tile,
                         send_rows=torch.from_numpy(order - start * per_tile),
                         send_counts=tuple(int(c) for c in send_counts),
                         recv_counts=tuple(int(c) for c in recv_counts))
