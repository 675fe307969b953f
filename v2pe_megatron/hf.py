"""HuggingFace InternVL checkpoints <-> the megatron-core InternVL model: the public names.

The implementation lives in :mod:`v2pe_megatron.convert` (docs/convert.md, docs/internvl.md); this
module keeps the API the README documents (``hf.load``, ``hf.weight_map``, ``hf.model_config_from_hf``,
``hf.hf_to_megatron``/``megatron_to_hf``, ``hf.HFCheckpointError``, ...).
"""

from __future__ import annotations

from v2pe_megatron.convert.errors import HFCheckpointError
from v2pe_megatron.convert.hf_config import hf_config_from_model, model_config_from_hf, special_token_ids
from v2pe_megatron.convert.load import load
from v2pe_megatron.convert.mappings import (Copy, FusedQKV, GatedMLP, GroupedQKV, Mapping, TensorMap,
                                            hf_to_megatron, megatron_to_hf, qkv_from_megatron, qkv_to_megatron,
                                            weight_map)
from v2pe_megatron.convert.safetensors_io import canonical_native_names, read_safetensors

__all__ = ["HFCheckpointError", "Copy", "FusedQKV", "GatedMLP", "GroupedQKV", "Mapping", "TensorMap",
           "canonical_native_names", "hf_config_from_model", "hf_to_megatron", "load", "megatron_to_hf",
           "model_config_from_hf", "qkv_from_megatron", "qkv_to_megatron", "read_safetensors",
           "special_token_ids", "weight_map"]
