"""Vision under context parallelism: each CP rank encodes a share of a pack's tiles, and the features
are all-gathered so every rank can place the ones its ``<IMG_CONTEXT>`` tokens need.

Every CP rank receives the whole micro-batch's ``pixel_values`` (the tokens are split, the images
are not). Tiles are cut into ``cp`` equal shares (the last padded with blank tiles, whose features
are dropped), so the vision tower's work and activations per rank are ~1/cp. The gather is an
autograd function: forward all-gathers the shares, backward sums the feature gradients of all ranks
(each rank only used the features of its own tokens) and hands each rank its share's, so every
rank's vision tower copy gets the gradient of the tiles it encoded; megatron's DDP then sums the
vision gradients over the data-and-context-parallel group as for every other weight. Which gathered
features a rank's tokens take is decided with the token split, by
:func:`v2pe_megatron.parallel.cp_split.image_feature_index`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather_shares", "encode_images_cp", "cp_group_of"]


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
    per = -(-tiles // size)
    if per * size != tiles:
        blank = pixel_values.new_zeros((per * size - tiles, *pixel_values.shape[1:]))
        pixel_values = torch.cat([pixel_values, blank])
    local = encode(pixel_values[rank * per:(rank + 1) * per])
    return gather_shares(local, group)[:tiles]


def cp_group_of(config) -> Optional[object]:
    """The CP group when ``config`` (the LLM's TransformerConfig) uses context parallelism, else None."""
    if getattr(config, "context_parallel_size", 1) <= 1:
        return None
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_group()
