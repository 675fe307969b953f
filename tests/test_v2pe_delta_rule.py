"""The inference-delta rule: last positions from counts equal compute_position_ids', and the choice."""

from __future__ import annotations

import numpy as np
import pytest

from v2pe_megatron.v2pe import choose_inference_delta, compute_position_ids, last_position

S, E, C = 5, 6, 7


def _sample(rng, n_images):
    toks, counts = [], []
    for _ in range(n_images):
        toks += list(rng.integers(10, 100, int(rng.integers(0, 20))))
        n = int(rng.integers(1, 600))
        toks += [S] + [C] * n + [E]
        counts.append(n)
    toks += list(rng.integers(10, 100, int(rng.integers(1, 20))))
    return np.asarray(toks, np.int64), counts


@pytest.mark.parametrize("delta", [1.0, 0.5, 1 / 16, 1 / 256, 0.7, 0.3])
def test_last_position_matches_compute_position_ids(delta):
    rng = np.random.default_rng(int(delta * 1000))
    for n_images in (0, 1, 5):
        toks, counts = _sample(rng, n_images)
        pos = compute_position_ids(toks, img_start_id=S, img_end_id=E, img_context_id=C, delta=delta)
        nonvisual = int(np.count_nonzero(toks != C))
        assert last_position(nonvisual, counts, delta) == pos[-1]


def test_choose_largest_fitting_delta():
    deltas = [1, 1 / 2, 1 / 4, 1 / 16, 1 / 64, 1 / 256]
    # 1000 text tokens + 8 images of 256 tokens: 999 + 8 * ceil(256 d)
    c = choose_inference_delta(1000, [256] * 8, 4096, deltas)
    assert (c.delta, c.last_position, c.fits) == (1.0, 999 + 2048, True)
    c = choose_inference_delta(1000, [256] * 8, 2048, deltas)     # 999 + 1024 = 2023 < 2048
    assert (c.delta, c.last_position, c.fits) == (0.5, 2023.0, True)
    c = choose_inference_delta(1000, [256] * 8, 1100, deltas)     # 999 + 8 * 16 = 1127; 999 + 8 * 4 = 1031
    assert (c.delta, c.fits) == (1 / 64, True)
    c = choose_inference_delta(5000, [256] * 8, 4096, deltas)     # the text alone overflows
    assert (c.delta, c.last_position, c.fits) == (1 / 256, 4999 + 8, False)
    # the order of the set does not matter
    assert choose_inference_delta(1000, [256] * 8, 2048, deltas[::-1]).delta == 0.5


def test_bad_inputs():
    with pytest.raises(ValueError, match="delta_set"):
        choose_inference_delta(10, [4], 100, [0.0])
    with pytest.raises(ValueError, match="trained_positions"):
        choose_inference_delta(10, [4], 0, [1.0])
    with pytest.raises(ValueError, match="num_nonvisual_tokens"):
        last_position(0, [4], 1.0)
