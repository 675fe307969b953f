"""Distributed-optimizer state in megatron's ``fully_reshardable`` layout, written and read DP-sharded.

megatron-core 0.19.2 offers three sharding types for the ``DistributedOptimizer``'s checkpoint
(``DistributedOptimizer.sharded_state_dict``, ``metadata["distrib_optim_sharding_type"]``):

- ``fully_reshardable``: model-space tensors (``optimizer.state.{param,exp_avg,exp_avg_sq}.<model
  key>``, each of its parameter's global shape), so they reshard across TP, PP, CP and DP. But
  ``sharded_param_state_fully_reshardable`` builds them with ``get_parameter_state_dp_zero(
  return_on_all_ranks=True)``: every rank all-gathers the flat state of its whole model shard over
  DP (its host memory grows by the model shard's optimizer state, whatever the DP size); the
  tensors keep the model weights' ``replica_id``, so DP rank 0 writes all of it; and on load every
  rank asks for whole tensors (reads all of its model shard's state, then slices its 1/DP out).
  The ``distrib_optim_fully_reshardable_mem_efficient`` flag gathers on DP rank 0 only: the same
  bytes, on one rank.
- ``dp_reshardable``: each rank writes and reads its own flat bucket shards (scales as 1/DP), but
  the tensors are the optimizer's buckets, so a checkpoint loads only where the buckets are the same:
  same TP, PP, virtual PP and bucket sizes (``load_parameter_state_from_dp_reshardable`` asserts
  ``per_bucket_numel_unpadded``).
- ``fully_sharded_model_space``: the model-space layout with each rank's flat range as a
  ``flattened_range`` ShardedTensor; 0.19.2 refuses it (``ShardedTensor.validate_metadata_integrity``
  raises "ShardedTensor.flattened_range is not supported").

This module writes the ``fully_reshardable`` tensors (same keys, shapes and dtype, so megatron's
own loader reads these checkpoints and this one reads checkpoints megatron wrote) without the
gather: each DP rank cuts the flat range of every parameter it owns (``param_map`` of the
optimizer's ``gbuf_ranges``) into a few rectangular boxes of the parameter's global tensor
(``flat_range_boxes``) and saves those as ShardedTensors of its own (``replica_id`` DP coordinate
0: each box has one owner). Loading asks for the boxes of this rank's ranges at *its* layout;
torch_dist reads the saved chunks that overlap them. Same layout: each rank reads what it wrote.
Another TP/PP/CP/DP: each rank reads the chunks its new ranges overlap, still about 1/DP.

Parameters whose sharded metadata is a ``ShardedTensorFactory`` (megatron's SwiGLU ``linear_fc1``
splits into two tensors) are cut per built tensor: the factory is built on a ``meta`` tensor of the
parameter's local shape, and each built tensor's view says which flat range of the parameter it
covers.
"""

from __future__ import annotations

import dataclasses
from math import prod
from typing import Any, Callable, Optional

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding, extract_sharded_tensors_and_factories

SHARDING_TYPE = "fully_reshardable"
STATE_PREFIX = "optimizer.state"  # megatron's prefix for the model-space optimizer tensors

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offset, size) in a tensor


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """The elements ``start:stop`` of a C-contiguous tensor of ``shape`` (flat order) as at most
    2 * ndim - 1 boxes, in flat order; the elements of each box are contiguous in that order."""
    shape = tuple(int(s) for s in shape)
    if start >= stop:
        return []
    if len(shape) == 1:
        return [((start,), (stop - start,))]
    inner = prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:
        return [((first, *o), (1, *s)) for o, s in
                flat_range_boxes(shape[1:], start - first * inner, stop - first * inner)]
    out: list[Box] = []
    if start % inner:  # the partial first row
        out += [((first, *o), (1, *s)) for o, s in flat_range_boxes(shape[1:], start - first * inner, inner)]
        first += 1
    full_end = stop // inner
    if full_end > first:
        out.append(((first,) + (0,) * (len(shape) - 1), (full_end - first, *shape[1:])))
    if stop % inner:  # the partial last row
        out += [((full_end, *o), (1, *s)) for o, s in flat_range_boxes(shape[1:], 0, stop - full_end * inner)]
    return out


def _pieces(sh) -> list[tuple[ShardedTensor, int]]:
    """The checkpoint tensors of one model parameter and where each starts in the parameter's flat
    local data: itself, or what its factory builds (built on ``meta``: no memory)."""
    if not isinstance(sh, ShardedTensorFactory):
        return [(sh, 0)]
    local = sh.data
    built = list(nested_values(dataclasses.replace(
        sh, data=torch.empty(local.shape, dtype=local.dtype, device="meta")).build()))
    pieces, covered = [], 0
    for b in sorted(built, key=lambda b: b.data.storage_offset()):
        if not isinstance(b, ShardedTensor) or not b.data.is_contiguous() or b.data.storage_offset() != covered:
            raise NotImplementedError(
                f"checkpoint factory {sh.key!r} does not split its parameter into contiguous ranges; the "
                f"DP-sharded optimizer format cannot cut it")
        pieces.append((b, covered))
        covered += b.data.numel()
    if covered != local.numel():
        raise NotImplementedError(f"checkpoint factory {sh.key!r} does not cover its parameter")
    return pieces


def _main_params_metadata(model_sharded_state_dict: dict) -> dict:
    sharded, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    return {sh.data: sh for sh in nested_values(sharded)}


@dataclasses.dataclass
class _Target:
    """Where loaded boxes go: one parameter's flat state (this rank's range) per state key."""
    model_param: torch.nn.Parameter
    flat: dict[str, torch.Tensor]
    views: list[tuple[str, str, torch.Tensor]]  # (sharded-dict key, state key, view into flat)


def _param_state(dist_opt, meta: dict, is_loading: bool) -> tuple[dict[str, ShardedTensor], list[_Target]]:
    keys = ("param",) + tuple(dist_opt.optimizer_state_keys)
    instance = getattr(dist_opt, "distributed_optimizer_instance_id", 0)
    sharded: dict[str, ShardedTensor] = {}
    targets: list[_Target] = []
    idx = 0
    for gbuf_range_maps in dist_opt.gbuf_ranges:
        for buckets in gbuf_range_maps.values():
            for bucket in buckets:
                for model_param, range_map in bucket["param_map"].items():
                    start, stop = range_map["param"].start, range_map["param"].end
                    if is_loading:
                        flat = {k: torch.empty(stop - start, dtype=torch.float32) for k in keys}
                    else:  # views of the live state (fp32 as megatron saves it: no copy for fp32 state)
                        live = dist_opt._get_main_param_and_optimizer_states(model_param)
                        flat = {k: live[k].detach().reshape(-1).float() for k in keys}
                    target = _Target(model_param, flat, [])
                    try:
                        sh = meta[model_param]
                    except KeyError as e:
                        raise ValueError(f"an optimizer parameter of shape {tuple(model_param.shape)} is not in "
                                         "the model's sharded state dict") from e
                    for piece, offset in _pieces(sh):
                        lo, hi = max(start, offset), min(stop, offset + prod(piece.local_shape))
                        if lo >= hi:
                            continue
                        replica = (*tuple(piece.replica_id)[:2], instance)  # every box has one owner in DP
                        p = piece.prepend_axis_num
                        at = lo
                        for box_offset, box_shape in flat_range_boxes(piece.local_shape, lo - offset, hi - offset):
                            n = prod(box_shape)
                            # megatron's uneven-shard path ignores prepended axes (stacked layers):
                            # they become leading axes of size 1 of the box itself
                            local_shape = (1,) * p + tuple(box_shape)
                            for k in keys:
                                view = flat[k][at - start: at - start + n].view(local_shape)
                                name = f"{idx}.{k}.{len(target.views)}"
                                sharded[name] = dataclasses.replace(
                                    piece, key=f"{STATE_PREFIX}.{k}.{piece.key}", data=view, dtype=torch.float32,
                                    local_shape=local_shape, axis_fragmentations=None, replica_id=replica,
                                    prepend_axis_num=0, global_offset=tuple(piece.global_offset[:p]) + tuple(
                                        g + b for g, b in zip(piece.global_offset[p:], box_offset)))
                                sharded[name].validate_metadata_integrity()
                                target.views.append((name, k, view))
                            at += n
                    targets.append(target)
                    idx += 1
    return sharded, targets


def _members(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def handles(optimizer, metadata: dict) -> bool:
    """Whether this module builds the optimizer's checkpoint dict: distributed optimizers, saved or
    to be loaded in the ``fully_reshardable`` layout. Anything else goes through megatron."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    members = _members(optimizer)
    return (metadata.get("distrib_optim_sharding_type") == SHARDING_TYPE and bool(members)
            and all(isinstance(m, DistributedOptimizer) and not m.ddp_config.use_megatron_fsdp for m in members))


def sharded_state_dict(optimizer, model_sharded_state_dict: dict, *, is_loading: bool,
                       metadata: dict) -> tuple[dict, Optional[Callable[[Any], None]]]:
    """The optimizer's part of a checkpoint dict, and the function that puts a loaded one back
    (None: call megatron's ``optimizer.load_state_dict``). The dict has the shape megatron's
    ``ChainedOptimizer``/``DistributedOptimizer.sharded_state_dict`` give it for ``metadata``, so
    the common (non-tensor) part of the checkpoint is the same either way."""
    if not handles(optimizer, metadata):
        sd = optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, metadata=metadata)
        return sd, None
    members = _members(optimizer)
    meta = _main_params_metadata(model_sharded_state_dict)
    if len(members) > 1:
        optimizer._synchronize_steps()  # as megatron's ChainedOptimizer does before a save
    prefix = len(members) > 1 and not metadata.get("chained_optim_avoid_prefix", False)
    parts, all_targets = [], []
    for i, member in enumerate(members):
        sd = member.state_dict()
        sd["param_state"], targets = _param_state(member, meta, is_loading)
        sd["param_state_sharding_type"] = SHARDING_TYPE
        if prefix:
            add_prefix_for_sharding(sd, f"chained_{i}.")
        parts.append(sd)
        all_targets.append(targets)
    state = parts[0] if len(members) == 1 else dict(enumerate(parts))

    def load(loaded) -> None:
        per_member = [loaded] if len(members) == 1 else [loaded[i] for i in range(len(members))]
        states = []
        for sd in per_member:
            states.append(sd.pop("param_state"))
            sd.pop("param_state_sharding_type", None)
        # non-tensor state (param groups, step, grad scaler): megatron's own load, without
        # ``param_state`` so that it allocates the optimizer state and leaves its values to us
        optimizer.load_state_dict(loaded)
        for member, targets, got in zip(members, all_targets, states):
            with torch.no_grad():
                for t in targets:
                    for name, _, view in t.views:
                        if got[name].data_ptr() != view.data_ptr():
                            view.copy_(got[name])
                    member._set_main_param_and_optimizer_states(t.model_param, t.flat)
            sync = getattr(member.optimizer, "_sync_hdo_state_to_sub_optimizers", None)
            if sync is not None:  # megatron's HybridDeviceOptimizer keeps copies in sub-optimizers
                sync()

    return state, load
