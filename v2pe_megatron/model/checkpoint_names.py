"""One set of checkpoint names for the local and the Transformer Engine layer specs, and the rule
that still reads checkpoints written with the old local names.

On disk every spec uses Transformer Engine's names: TE fuses the pre-norms into the following
linear layers (``self_attention.linear_qkv.layer_norm_{weight,bias}``,
``mlp.linear_fc1.layer_norm_{weight,bias}``), and the local spec maps its separate norm modules
(``input_layernorm``, ``pre_mlp_layernorm``) onto those names with the layer's
``sharded_state_dict_keys_map`` (:data:`LOCAL_TO_TE`, the same map megatron-core's local GPT spec
uses). A checkpoint therefore loads into either spec, LLM and vision tower alike; only the modules'
own ``state_dict()`` keys still differ (see :func:`checkpoint_name`).

Checkpoints written before that map existed hold the local names. They are read by pointing the
loading request at them (:func:`stored_name`), never by rewriting files: :func:`retarget` is the one
call every load path makes on its sharded state dict (weights and distributed-optimizer state, whose
keys embed the model keys: ``optimizer.state.<state>.<model key>``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Container
from typing import Optional

# local spec module prefix -> Transformer Engine name prefix, inside one transformer layer
LOCAL_TO_TE: dict[str, str] = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}

_SUFFIXES = "weight|bias"
# Checkpoint keys of layer tensors have no layer number (megatron stacks the layers), module names
# and non-homogeneous keys do: "(<digits>.)" is optional in both patterns.
_TO_LEGACY = [(re.compile(rf"(\.layers\.(?:\d+\.)?){re.escape(te)}({_SUFFIXES})$"), rf"\g<1>{local}\g<2>")
              for local, te in LOCAL_TO_TE.items()]
_TO_TE = [(re.compile(rf"(\.layers\.(?:\d+\.)?){re.escape(local)}({_SUFFIXES})$"), rf"\g<1>{te}\g<2>")
          for local, te in LOCAL_TO_TE.items()]


def checkpoint_name(name: str) -> str:
    """The on-disk (TE) name of a parameter named ``name`` in either spec's module tree
    (``...layers.3.input_layernorm.weight`` -> ``...layers.3.self_attention.linear_qkv.layer_norm_weight``)."""
    for pattern, repl in _TO_TE:
        out, n = pattern.subn(repl, name)
        if n:
            return out
    return name


def legacy_name(key: str) -> Optional[str]:
    """The local spec's name for ``key`` in checkpoints written before the names were unified, or
    None when ``key`` has no other name. Anchored at the end: any prefix (``optimizer.state.exp_avg.``)
    is kept."""
    for pattern, repl in _TO_LEGACY:
        out, n = pattern.subn(repl, key)
        if n:
            return out
    return None


def stored_name(key: str, available: Container[str]) -> str:
    """Where a checkpoint that holds ``available`` keeps ``key``: the key itself, or its legacy name
    when only that is there. The one rule every reader applies."""
    if key in available:
        return key
    old = legacy_name(key)
    return old if old is not None and old in available else key


def retarget(sharded_state_dict: dict, checkpoint_dir: str | os.PathLike) -> dict:
    """Point a loading request at the names the checkpoint in ``checkpoint_dir`` really holds, in
    place; returns it (``dist_checkpointing.load(retarget(sd, path), path)``).

    Tensors asked for by their current name that the checkpoint keeps under the legacy local name
    are read from there (:func:`stored_name`). Transformer Engine's ``_extra_state`` objects (FP8
    metadata) that the checkpoint does not hold, because a local-spec model wrote it, keep the
    module's own value instead of failing the load; the model's ``load_state_dict`` then sets what
    it already has. Reads the checkpoint's metadata once (every rank; it is small).
    """
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import (LocalNonpersistentObject, ShardedObject, ShardedTensor,
                                                          ShardedTensorFactory)
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    available = set(load_sharded_metadata(str(checkpoint_dir)))

    def fix(x):
        if isinstance(x, (ShardedTensor, ShardedTensorFactory)):
            x.key = stored_name(x.key, available)
        elif isinstance(x, ShardedObject) and x.key.endswith("_extra_state") and x.unique_key not in available:
            return LocalNonpersistentObject(x.data)
        return x

    dict_list_map_inplace(fix, sharded_state_dict)
    return sharded_state_dict
