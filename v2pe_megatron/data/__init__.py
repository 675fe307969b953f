"""Multimodal data pipeline: InternVL-format datasets -> DALI tiles + chat tokens -> packed sequences.

Modules: ``formats`` (meta/jsonl/webdataset readers, mixing, shuffling, sharding), ``tiling`` (grid
rule, DALI pipeline, Pillow reference), ``tokenizer`` (sentencepiece + special tokens), ``chat``
(templates, ``<image>`` expansion, loss masks), ``packing``, ``skips``, ``synthetic``, ``loader``.
"""

from v2pe_megatron.data.loader import TrainLoader, build_train_loader
from v2pe_megatron.data.packing import collate
from v2pe_megatron.data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer, tiny_tokenizer

__all__ = ["TrainLoader", "build_train_loader", "collate", "Tokenizer", "build_tokenizer", "load_tokenizer",
           "tiny_tokenizer"]
