"""How a DP rank's flat range of a parameter becomes checkpoint tensors (``training/optimizer_state``):
boxes that tile exactly that range, in flat order, and megatron's SwiGLU factory cut into the two
halves it saves. No ranks: the multi-rank proof is ``test_optimizer_checkpoint.py``."""

from __future__ import annotations

import random
from math import prod

import pytest
import torch

from v2pe_megatron.training.optimizer_state import _pieces, flat_range_boxes


def _covered(shape, boxes) -> list[int]:
    """The flat indices the boxes cover, box by box in order."""
    idx = torch.arange(prod(shape)).reshape(shape)
    out = []
    for off, size in boxes:
        out += idx[tuple(slice(o, o + s) for o, s in zip(off, size))].reshape(-1).tolist()
    return out


@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 3, 5), (2, 3, 4, 5), (1, 6), (6, 1)])
def test_boxes_tile_the_range_in_flat_order(shape):
    n = prod(shape)
    rng = random.Random(0)
    ranges = [(0, n), (0, 1), (n - 1, n), (3 % n, n)] + [tuple(sorted(rng.sample(range(n + 1), 2))) for _ in range(40)]
    for start, stop in ranges:
        boxes = flat_range_boxes(shape, start, stop)
        assert _covered(shape, boxes) == list(range(start, stop)), (shape, start, stop, boxes)
        assert len(boxes) <= max(1, 2 * len(shape) - 1)
        assert all(len(o) == len(s) == len(shape) and min(s) > 0 for o, s in boxes)


def test_partial_rows_make_three_boxes():
    assert flat_range_boxes((4, 10), 7, 33) == [((0, 7), (1, 3)), ((1, 0), (2, 10)), ((3, 0), (1, 3))]
    assert flat_range_boxes((4, 10), 10, 30) == [((1, 0), (2, 10))]
    assert flat_range_boxes((4, 10), 5, 5) == []


def test_swiglu_factory_is_cut_into_its_two_halves():
    """megatron's linear_fc1 under SwiGLU saves W and V as separate chunks of one tensor; the pieces
    say where each starts in the local parameter, built on meta (no memory)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    local = torch.zeros(6, 4)  # this TP rank's [W; V] rows (TP=2: W and V of 6 rows each globally)
    sh = ShardedTensor.from_rank_offsets("fc1.weight", local, (0, 1, 2), replica_id=(0, 0, 0))
    pieces = _pieces(apply_swiglu_sharded_factory(sh, ()))
    assert [off for _, off in pieces] == [0, 12]
    (w, _), (v, _) = pieces
    assert w.key == v.key == "fc1.weight" and w.local_shape == v.local_shape == (3, 4)
    assert w.global_shape == (12, 4) and w.global_offset == (3, 0) and v.global_offset == (9, 0)
    assert w.data.device.type == "meta"
