"""Context-parallel index map for packed sequences.

Megatron's load-balanced ("zigzag") split cuts a sequence into 2*cp chunks and gives rank r chunks
r and 2*cp-1-r, so that every rank holds as much early (cheap) as late (expensive) causal work. For
a pack of several sub-samples the split must happen per sub-sample (the reference cut the whole
pack, which is only right for a single sequence): this is Transformer Engine's THD layout
(``thd_get_partitioned_indices``) and what megatron's unfused THD rotary path assumes.

Tokens, labels, loss masks and V2PE position ids must all be sliced with the same map; a pure numpy
function of the padded lengths, it needs no process group. The image features follow the tokens:
:func:`image_feature_index` says which of a pack's features a rank's ``<IMG_CONTEXT>`` tokens take.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from v2pe_megatron.parallel.layout import check_multiple, seq_multiple

__all__ = ["zigzag_index_map", "split_for_cp", "cp_local_seq_lens", "image_feature_index"]


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
