"""Packed micro-batches -> megatron's ``PackedSeqParams`` and this context-parallel rank's share.

Input is a :class:`~v2pe_megatron.parallel.batch.MicroBatch` from the data pipeline: [B, S] tokens,
labels, loss mask, float64 V2PE positions and, per row, ``seq_lens``: the padded sub-sample lengths
(each a multiple of the layout's ``seq_multiple``, the pack's tail included, so a row's lengths sum
to S).

Convention (megatron's and Transformer Engine's): ``cu_seqlens`` always describe the *whole* pack
in global offsets, also on a CP rank that holds only its zigzag share of the tokens; attention
derives the local layout from them.

Every per-token tensor (tokens, labels, loss mask, V2PE positions, per-token loss weights when the
batch carries them) is sliced with one :func:`~v2pe_megatron.parallel.cp_split.zigzag_index_map`,
so each rank's rotary angles are computed for exactly its tokens (the model turns the positions
into cos/sin once per micro-batch, see :class:`PackParams`). Two formats
(:attr:`v2pe_megatron.parallel.layout.Layout.qkv_format`):

- ``sbhd`` (local spec, CPU or any GPU without TE): tensors stay [b, s_local]; ``cu_seqlens`` per
  row (a list of int32 tensors, one tensor when all rows agree), on the host.
- ``thd`` (Transformer Engine spec): rows are flattened into one [1, B*S] pack (TE's packed
  format has no batch dim), sliced with the map of the flattened pack. ``cu_seqlens`` are int32 on
  the compute device and ``max_seqlen`` a Python int, as TE requires.

Host syncs: the lengths are known on the host when the batch is made, so :class:`PackParams` also
carries them as Python ints; attention reads those instead of reading device tensors back in every
layer (megatron's own THD rotary path does, twice per sub-sample per layer, which is why the model
applies V2PE's rotary itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from v2pe_megatron.parallel.batch import MicroBatch
from v2pe_megatron.parallel.cp_split import image_exchange, split_for_cp, zigzag_index_map
from v2pe_megatron.parallel.layout import check_multiple, seq_multiple

__all__ = ["PackParams", "packed_seq_params", "host_cu_seqlens", "split_batch_for_cp", "QKV_FORMATS"]

QKV_FORMATS = ("sbhd", "thd")


@dataclass
class PackParams(PackedSeqParams):
    """megatron's ``PackedSeqParams`` plus what this project's attention reads without touching the
    device: the cumulative lengths as Python ints, and the micro-batch's rotary cos/sin.

    ``host_cu_seqlens`` / ``host_cu_seqlens_padded``: per row (sbhd) or for the one flattened pack
    (thd), the same values as the ``cu_seqlens_q`` / ``cu_seqlens_q_padded`` tensors. ``rotary``:
    (cos, sin), each [s_local, b, 1, rotary dim] in the compute dtype, filled in by the language
    model once per micro-batch (``model.language``) and applied in every layer's core attention
    (``model.attention.V2PERotary``). megatron passes this object through its layers (also into
    activation recompute, by closure) and hands Transformer Engine only the base class's fields.
    """

    host_cu_seqlens: Optional[tuple[tuple[int, ...], ...]] = None
    host_cu_seqlens_padded: Optional[tuple[tuple[int, ...], ...]] = None
    rotary: Optional[tuple[Tensor, Tensor]] = None
    # int64 indices into the rank's [s_local * b] tokens (s-major, the hidden states' order) whose
    # loss is trained (loss_mask != 0), taken on the host by the split: the output layer and the
    # cross entropy run on these rows only (model.language). None: every row.
    loss_rows: Optional[Tensor] = None
    # Derived per-layout facts attention computes once per micro-batch instead of once per layer.
    memo: dict = field(default_factory=dict, compare=False, repr=False)


def host_cu_seqlens(p: Optional[PackedSeqParams], batch: int) -> tuple[Optional[list], Optional[list]]:
    """(padded, real) cumulative lengths per row as Python int lists, or (None, None) without
    packing. ``real`` is None when the pack carries no separate unpadded lengths. Read from
    :class:`PackParams`' host copies; a plain ``PackedSeqParams`` (tests, callers outside the
    training path) is read back from its tensors."""
    if p is None:
        return None, None
    if isinstance(p, PackParams) and p.host_cu_seqlens_padded is not None:
        padded = [list(r) for r in p.host_cu_seqlens_padded]
        real = [list(r) for r in p.host_cu_seqlens] if p.host_cu_seqlens is not None else None
    else:
        cu_p = p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q
        if cu_p is None:
            return None, None
        cu_r = p.cu_seqlens_q if p.cu_seqlens_q_padded is not None else None

        def rows(cu):
            return [[int(x) for x in (r.tolist() if torch.is_tensor(r) else r)]
                    for r in (cu if isinstance(cu, (list, tuple)) else [cu])]

        padded = rows(cu_p)
        real = rows(cu_r) if cu_r is not None else None
    if len(padded) == 1 and batch > 1:  # one set of lengths shared by every row
        padded = padded * batch
        real = real * batch if real is not None else None
    if len(padded) != batch:
        raise ValueError(f"got cu_seqlens for {len(padded)} rows but the batch has {batch}")
    return padded, real


def _rows(seq_lens: Any) -> list[list[int]]:
    if isinstance(seq_lens, torch.Tensor) and seq_lens.dim() == 1:
        seq_lens = [seq_lens]
    return [[int(x) for x in (r.tolist() if hasattr(r, "tolist") else r)] for r in seq_lens]


def _cu(lens: Sequence[int], device) -> torch.Tensor:
    return torch.tensor(np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]), dtype=torch.int32, device=device)


def _check(rows: list[list[int]], unpadded: Optional[list[list[int]]], seq_length: Optional[int],
           multiple: int) -> None:
    for i, r in enumerate(rows):
        if any(n < 0 for n in r):
            raise ValueError(f"row {i}: negative sub-sample length in {r}")
        if seq_length is not None and sum(r) != seq_length:
            raise ValueError(f"row {i}: sub-sample lengths sum to {sum(r)}, the row holds {seq_length} tokens; "
                             f"seq_lens must cover the whole row (the padding tail as its own sub-sample)")
        check_multiple(r, multiple, f"row {i}: sub-sample")
        if unpadded is not None:
            u = unpadded[i]
            if len(u) != len(r) or any(not 0 <= a <= b for a, b in zip(u, r)):
                raise ValueError(f"row {i}: unpadded lengths {u} do not fit the padded lengths {r}")


def packed_seq_params(seq_lens: Any, *, seq_lens_unpadded: Any = None, qkv_format: str = "sbhd",
                      cp_size: int = 1, device: torch.device | str | None = None) -> PackedSeqParams:
    """``PackedSeqParams`` for a micro-batch whose rows hold sub-samples of (padded) ``seq_lens``.

    Checks that every sub-sample splits into 2*cp_size chunks. ``sbhd``: per-row cu_seqlens;
    ``thd``: one cu_seqlens over the rows flattened in order.
    """
    if qkv_format not in QKV_FORMATS:
        raise ValueError(f"qkv_format={qkv_format!r} is not one of {QKV_FORMATS}")
    rows = _rows(seq_lens)
    unpadded = _rows(seq_lens_unpadded) if seq_lens_unpadded is not None else None
    _check(rows, unpadded, None, seq_multiple(cp_size))
    if len({sum(r) for r in rows}) > 1:
        raise ValueError(f"rows of a micro-batch must have equal lengths, got {[sum(r) for r in rows]}")
    real = unpadded if unpadded is not None else rows
    max_len = max((n for r in rows for n in r), default=0)

    def host(lens: list[int]) -> tuple[int, ...]:
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]))

    if qkv_format == "thd":
        flat, flat_real = [n for r in rows for n in r], [n for r in real for n in r]
        cu_p, cu_r = _cu(flat, device), _cu(flat_real, device)
        if unpadded is None:
            cu_r = cu_p
        host_p, host_r = (host(flat),), (host(flat_real),)
    else:
        cu_p_rows = [_cu(r, device) for r in rows]
        cu_r_rows = [_cu(r, device) for r in real] if unpadded is not None else cu_p_rows
        same = all(r == rows[0] for r in rows) and (unpadded is None or all(u == real[0] for u in real))
        cu_p = cu_p_rows[0] if same else cu_p_rows
        cu_r = cu_r_rows[0] if same else cu_r_rows
        host_p, host_r = tuple(host(r) for r in rows), tuple(host(r) for r in real)
    return PackParams(qkv_format=qkv_format, cu_seqlens_q=cu_r, cu_seqlens_kv=cu_r,
                      cu_seqlens_q_padded=cu_p, cu_seqlens_kv_padded=cu_p,
                      max_seqlen_q=max_len, max_seqlen_kv=max_len,
                      host_cu_seqlens=host_r if unpadded is not None else None, host_cu_seqlens_padded=host_p)


def split_batch_for_cp(batch: MicroBatch, *, cp_size: int, cp_rank: int, qkv_format: str = "sbhd",
                       img_context_id: Optional[int] = None, device: torch.device | str | None = None,
                       seq_lens_unpadded: Any = None) -> MicroBatch:
    """This CP rank's share of a packed micro-batch, with ``packed_seq_params`` filled in.

    Every per-token tensor is sliced with the one zigzag index map of its row (in ``thd`` the rows
    are flattened into one pack first).
    With ``img_context_id`` (and cp > 1) the tiles are split too: ``image_exchange`` holds the plan
    (:func:`~v2pe_megatron.parallel.cp_split.image_exchange`) and ``pixel_values`` only this rank's
    :func:`~v2pe_megatron.parallel.cp_split.tile_share`, cut here from a batch holding every tile,
    or checked against the share a loader already decoded (``batch.tile_range``). Per-image metadata
    passes through whole, and ``num_image_tokens`` counts the rank's ``<IMG_CONTEXT>`` tokens (on the
    host, before anything moves). ``device``: where ``cu_seqlens`` live (TE reads them on the GPU).
    ``seq_lens_unpadded`` (per row) marks each sub-sample's padding, which attention then masks.
    """
    if qkv_format not in QKV_FORMATS:
        raise ValueError(f"qkv_format={qkv_format!r} is not one of {QKV_FORMATS}")
    tokens = batch.tokens
    B, S = tokens.shape
    rows = _rows(batch.seq_lens)
    if len(rows) != B:
        raise ValueError(f"seq_lens has {len(rows)} rows but tokens has {B}")
    unpadded = _rows(seq_lens_unpadded) if seq_lens_unpadded is not None else None
    _check(rows, unpadded, S, seq_multiple(cp_size))
    fields = batch.token_fields()
    for k in fields:
        t = getattr(batch, k)
        if t.shape[:2] != (B, S):
            raise ValueError(f"batch.{k} has shape {tuple(t.shape)}, expected [{B}, {S}, ...]")
    psp = packed_seq_params(rows, seq_lens_unpadded=unpadded, qkv_format=qkv_format, cp_size=cp_size,
                            device=tokens.device if device is None else device)
    if qkv_format == "thd":
        sliced = {k: getattr(batch, k).reshape(1, B * S) for k in fields}
        if cp_size > 1:
            index = torch.from_numpy(zigzag_index_map([n for r in rows for n in r], cp_size, cp_rank))
            sliced = {k: split_for_cp(t, index, 1) for k, t in sliced.items()}
    elif cp_size == 1:  # nothing to split: no index maps on this per-micro-batch path
        sliced = {k: getattr(batch, k) for k in fields}
    else:
        maps = [torch.from_numpy(zigzag_index_map(r, cp_size, cp_rank)) for r in rows]
        sliced = {k: torch.stack([split_for_cp(getattr(batch, k)[i], m, 0) for i, m in enumerate(maps)])
                  for k in fields}
    if img_context_id is not None and cp_size > 1:
        sliced.update(_image_share(batch, rows, cp_size, cp_rank, img_context_id))
    if img_context_id is not None:
        sliced["num_image_tokens"] = int((sliced["tokens"] == img_context_id).sum())
    psp.loss_rows = loss_rows(sliced["loss_mask"])
    return batch.replace(**sliced, packed_seq_params=psp)


def loss_rows(loss_mask: Tensor) -> Tensor:
    """The trained tokens of a [b, s] loss mask as indices into the s-major [s * b] order of the
    model's hidden states, on the mask's device (the split runs on the host, so the model never
    reads a count back from the GPU)."""
    return torch.nonzero(loss_mask.t().reshape(-1), as_tuple=True)[0]


def _image_share(batch: MicroBatch, rows: list[list[int]], cp_size: int, cp_rank: int,
                 img_context_id: int) -> dict[str, Any]:
    """``pixel_values`` cut to this rank's tile share, ``tile_range`` and the ``image_exchange`` plan."""
    pv = batch.pixel_values
    if batch.num_tiles is not None:
        total = int(batch.num_tiles.sum())
    elif batch.tile_range is None:
        total = 0 if pv is None else int(pv.shape[0])
    else:
        raise ValueError("a micro-batch holding a tile share (tile_range) must carry num_tiles")
    plan = image_exchange(batch.tokens, [n for r in rows for n in r], img_context_id, total, cp_size, cp_rank)
    start, stop = plan.tile_range
    held = 0 if pv is None else int(pv.shape[0])
    if batch.tile_range is None:
        if held != total:
            raise ValueError(f"the micro-batch holds {held} tiles, its num_tiles add up to {total}")
        pv = pv[start:stop] if pv is not None else None
    elif tuple(batch.tile_range) != (start, stop) or held != stop - start:
        raise ValueError(f"CP rank {cp_rank} of {cp_size} was given tiles {tuple(batch.tile_range)} ({held} held) "
                         f"but its share is [{start}, {stop}): build the loader with this rank's cp_rank/cp_size "
                         f"(data.loader.build_train_loader)")
    return {"pixel_values": pv, "tile_range": (start, stop), "image_exchange": plan}
