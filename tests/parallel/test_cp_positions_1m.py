"""V2PE positions under context parallelism past 2^20: a pack whose one sub-sample is longer than
1M tokens, with images (deltas 1/2 ... 1/256) up to its end, split for CP in both formats, gives each
rank exactly the float64 reference positions of its tokens (no rounding anywhere on the way)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from v2pe_megatron.parallel.batch import MicroBatch
from v2pe_megatron.parallel.cp_split import zigzag_index_map
from v2pe_megatron.parallel.packed_seq import split_batch_for_cp
from v2pe_megatron.v2pe import compute_position_ids

S_ID, E_ID, C_ID = 5, 6, 7
LONG = (1 << 20) + (1 << 16)   # the sub-sample past 2^20
TAIL = 1 << 12                 # a second sub-sample: positions restart


def _pack():
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 500, LONG + TAIL)
    deltas = []
    # Images every ~64K tokens, the last ones past position 2^20.
    for at in [*range(1000, LONG - 5000, 1 << 16), LONG - 2000]:
        n = int(rng.integers(64, 1024))
        ids[at] = S_ID
        ids[at + 1:at + 1 + n] = C_ID
        ids[at + 1 + n] = E_ID
        deltas.append(float(rng.choice([0.5, 0.25, 1 / 16, 1 / 64, 1 / 256])))
    return ids, deltas


def _reference(ids: np.ndarray, deltas: list[float]) -> np.ndarray:
    """Token by token (the deltas are powers of two: every sum is exact in float64)."""
    out = np.empty(ids.size, dtype=np.float64)
    p, img, k, j = -1, 0, 0, 0
    for i, t in enumerate(ids.tolist()):
        if t == S_ID:
            p += 1
            img, k = p, 0
            out[i] = p
        elif t == C_ID:
            k += 1
            out[i] = img + deltas[j] * k
        elif t == E_ID:
            p = int(np.ceil(img + deltas[j] * k)) + 1
            out[i] = p
            j += 1
        else:
            p += 1
            out[i] = p
    return out


@pytest.mark.parametrize("fmt,cp", [("sbhd", 8), ("thd", 4)])
def test_cp_share_of_a_1m_pack_is_the_float64_reference(fmt, cp):
    ids, deltas = _pack()
    first = compute_position_ids(ids[:LONG], img_start_id=S_ID, img_end_id=E_ID, img_context_id=C_ID, delta=deltas)
    tail = compute_position_ids(ids[LONG:], img_start_id=S_ID, img_end_id=E_ID, img_context_id=C_ID, delta=1.0)
    pos = np.concatenate([first, tail])
    want = np.concatenate([_reference(ids[:LONG], deltas), np.arange(TAIL, dtype=np.float64)])
    np.testing.assert_array_equal(pos, want)
    assert pos.max() > 1 << 20 and (pos[pos > 1 << 20] % 1 != 0).any()  # fractional positions past 2^20
    t = torch.from_numpy(ids).reshape(1, -1)
    batch = MicroBatch(tokens=t, labels=t.roll(-1, 1), loss_mask=torch.ones(1, ids.size),
                       position_ids=torch.from_numpy(pos).reshape(1, -1), seq_lens=[torch.tensor([LONG, TAIL])])
    for rank in (0, cp - 1):
        part = split_batch_for_cp(batch, cp_size=cp, cp_rank=rank, qkv_format=fmt)
        assert part.position_ids.dtype == torch.float64
        index = zigzag_index_map([LONG, TAIL], cp, rank)
        # Both formats: the rank's own tokens' positions (its rotary cos/sin are computed from them).
        np.testing.assert_array_equal(part.position_ids.numpy()[0], want[index])
        np.testing.assert_array_equal(part.tokens.numpy()[0], ids[index])
