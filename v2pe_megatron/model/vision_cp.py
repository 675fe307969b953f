"""Vision under context parallelism: each CP rank holds and encodes only its share of a pack's tiles,
and an all-to-all hands every feature row to the rank whose ``<IMG_CONTEXT>`` token takes it.

The share and the plan are decided with the token split, in ``parallel/cp_split.py``
(:func:`~v2pe_megatron.parallel.cp_split.tile_share`,
:func:`~v2pe_megatron.parallel.cp_split.image_exchange`): the data loader decodes only the rank's
tiles and :func:`encode_images_exchange` encodes them, picks the rows each other rank needs and
exchanges them with per-pair counts, so a rank sends only what is needed and receives exactly its
tokens' features, in order. The exchange is an autograd function whose backward is the reverse
all-to-all of the feature gradients, which land (``index_select``'s backward sums repeated rows) on
the rank that encoded the tile; megatron's DDP then sums the vision gradients over the
data-and-context-parallel group as for every other weight.

Kept as the reference the exchange is proven equal to (and for callers that hold every tile):
:func:`encode_images_cp`, where every rank receives all tiles, encodes a share and all-gathers the
features, and :func:`~v2pe_megatron.parallel.cp_split.image_feature_index` picks the rank's rows.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from v2pe_megatron.parallel.cp_split import tile_share

__all__ = ["gather_shares", "encode_images_cp", "exchange_rows", "encode_images_exchange", "cp_group_of"]


class _GatherShares(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: Tensor, group) -> Tensor:
        ctx.group = group
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        group = ctx.group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        share = grad.shape[0] // size
        if dist.get_backend(group) == "nccl":
            out = torch.empty((share, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        # gloo has no reduce-scatter: sum everything, keep this rank's share.
        dist.all_reduce(grad, group=group)
        return grad[rank * share:(rank + 1) * share].clone(), None


def gather_shares(local: Tensor, group) -> Tensor:
    """Concatenation along dim 0 of every rank's equal-sized ``local`` (differentiable)."""
    return _GatherShares.apply(local, group)


def encode_images_cp(encode: Callable[[Tensor], Tensor], pixel_values: Tensor, group=None) -> Tensor:
    """``encode(pixel_values)`` ([T, ...] -> [T, n, h]) computed as ``cp`` shares over ``group``.

    Without a group (or a group of one) this is just ``encode(pixel_values)``.
    """
    size = dist.get_world_size(group) if group is not None else 1
    if size == 1:
        return encode(pixel_values)
    rank = dist.get_rank(group)
    tiles = pixel_values.shape[0]
    per = tile_share(tiles, size, 0)[1]  # the largest share: the all-gather takes equal ones, so pad
    if per * size != tiles:
        blank = pixel_values.new_zeros((per * size - tiles, *pixel_values.shape[1:]))
        pixel_values = torch.cat([pixel_values, blank])
    local = encode(pixel_values[rank * per:(rank + 1) * per])
    return gather_shares(local, group)[:tiles]


class _ExchangeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, send_counts: tuple, recv_counts: tuple, group) -> Tensor:
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), list(recv_counts), list(send_counts), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        send_counts, recv_counts = ctx.counts
        out = grad.new_empty((sum(send_counts), *grad.shape[1:]))
        # The reverse exchange: each row's gradient goes back to the rank that sent (encoded) it.
        dist.all_to_all_single(out, grad.contiguous(), list(send_counts), list(recv_counts), group=ctx.group)
        return out, None, None, None


def exchange_rows(rows: Tensor, send_counts, recv_counts, group) -> Tensor:
    """All-to-all of ``rows`` (grouped by destination, ``send_counts`` per rank) over ``group``: the
    rows received, ``recv_counts`` per source rank, concatenated in rank order (differentiable)."""
    return _ExchangeRows.apply(rows, tuple(send_counts), tuple(recv_counts), group)


def encode_images_exchange(encode: Callable[[Tensor], Tensor], pixel_share: Tensor, plan, group, *,
                           hidden_size: int, zero: Optional[Tensor] = None) -> Tensor:
    """[plan.num_recv, h]: the features of this rank's ``<IMG_CONTEXT>`` tokens, in local order.

    ``pixel_share`` holds only this rank's tiles (``plan.tile_range``, an ImageExchange); ``encode``
    maps [t, ...] -> [t, n, hidden_size]. A rank whose share is empty encodes nothing; ``zero`` (a 0-valued
    scalar hanging off the trainable vision and projector parameters) keeps them in the graph so
    every rank runs the exchange's backward (a collective) when any does.
    """
    start, stop = plan.tile_range
    if pixel_share.shape[0] != stop - start:
        raise ValueError(f"this CP rank holds {pixel_share.shape[0]} tiles, its share is tiles [{start}, {stop}): "
                         f"pass the micro-batch through parallel.packed_seq.split_batch_for_cp")
    if stop > start:
        feats = encode(pixel_share)
        feats = feats.reshape(-1, feats.shape[-1])
        if feats.shape[0] != (stop - start) * plan.tokens_per_tile:
            raise ValueError(f"{stop - start} tiles gave {feats.shape[0]} feature rows, the pack's tokens "
                             f"expect {plan.tokens_per_tile} per tile")
        rows = feats.index_select(0, plan.send_rows.to(feats.device))
    else:
        # Without ``zero`` (vision and projector frozen) no rank's rows need a gradient: no rank runs
        # the exchange's backward, so the ranks still agree.
        rows = pixel_share.new_zeros((0, hidden_size)) if zero is None else zero.new_zeros((0, hidden_size)) + zero
    return exchange_rows(rows, plan.send_counts, plan.recv_counts, group)


def cp_group_of(config) -> Optional[object]:
    """The CP group when ``config`` (the LLM's TransformerConfig) uses context parallelism, else None."""
    if getattr(config, "context_parallel_size", 1) <= 1:
        return None
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_group()
