"""The parallel layout and everything derived from it, asked by data/, model/ and training/ alike.

- ``layout``: the frozen :class:`Layout` (sizes, spec, seq multiple, qkv format, schedule shape) and
  every layout rule with its actionable message;
- ``batch``: :class:`MicroBatch`, the one micro-batch type from the loader to the forward step;
- ``cp_split``: the per-sub-sample zigzag index map and the image-feature index that follows it;
- ``packed_seq``: megatron ``PackedSeqParams`` and a micro-batch's context-parallel share.
"""

# Only the torch-free layout here: the recipe validation imports this package before torch is needed.
from v2pe_megatron.parallel.layout import Layout, LayoutError

__all__ = ["Layout", "LayoutError"]
