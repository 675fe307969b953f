"""Multimodal data pipeline: InternVL-format datasets -> DALI tiles + chat tokens -> packed sequences.

Modules: ``formats`` (meta/jsonl/webdataset readers, mixing, shuffling, sharding), ``tiling`` (grid
rule, DALI pipeline, Pillow reference), ``tokenizer`` (HF tokenizers or sentencepiece + the folder's special tokens), ``chat``
(templates, ``<image>`` expansion, loss masks), ``packing``, ``skips``, ``synthetic``, ``loader``.
"""

from __future__ import annotations

import importlib
from typing import Any

# Re-exported lazily: importing one light module (``data.tokenizer``, which ``v2pe-train`` reads
# before it starts any rank) must not import the loader, and with it torch and megatron-core.
_EXPORTS = {"TrainLoader": "loader", "build_train_loader": "loader", "collate": "packing",
            "Tokenizer": "tokenizer", "build_tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
            "tiny_tokenizer": "tokenizer"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
