"""V2PE positions (docs/v2pe.md) and delta policies."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from v2pe_megatron import v2pe
from v2pe_megatron.config import DEFAULT_DELTA_SET, V2PEConfig
from v2pe_megatron.v2pe import (DefaultDeltaPolicy, FixedDeltaPolicy, RandomDeltaPolicy, compute_position_ids,
                                make_delta_policy)

S, E, C = 92544, 92545, 92546  # InternVL2-2B <img>, </img>, <IMG_CONTEXT>
IDS = dict(img_start_id=S, img_end_id=E, img_context_id=C)


def pos(ids, delta):
    return compute_position_ids(ids, delta=delta, **IDS)


def image(n: int) -> list[int]:
    return [S] + [C] * n + [E]


def reference_positions(ids: list[int], deltas: list[float]) -> np.ndarray:
    """The rule written token by token, with exact rationals for the ceiling (independent of the
    vectorized code: no cumsum, no snapping)."""
    out: list[float] = []
    p = -1
    img_pos = None
    k = 0
    j = 0
    for t in ids:
        if t == S:
            p += 1
            img_pos, k = p, 0
            out.append(float(p))
        elif t == C:
            k += 1
            out.append(img_pos + deltas[j] * k)
        elif t == E:
            last = Fraction(img_pos) + Fraction(deltas[j]).limit_denominator(1 << 20) * k
            p = math.ceil(last) + 1
            out.append(float(p))
            img_pos, j = None, j + 1
        else:
            p += 1
            out.append(float(p))
    return np.array(out, dtype=np.float64)


def test_design_worked_examples():
    four = [1, 2, 3] + image(4) + [4, 5]
    np.testing.assert_array_equal(pos(four, 0.25), [0, 1, 2, 3, 3.25, 3.5, 3.75, 4.0, 5, 6, 7])
    two = [1, 2, 3] + image(2) + [4, 5]
    np.testing.assert_array_equal(pos(two, 0.25), [0, 1, 2, 3, 3.25, 3.5, 5, 6, 7])
    out = pos(np.array(four), 0.25)
    assert out.dtype == np.float64 and out.shape == (11,)


def test_delta_one_is_arange_and_no_image_is_arange():
    ids = [7] * 5 + image(256) + [8] * 3 + image(512) + [9]
    np.testing.assert_array_equal(pos(ids, 1.0), np.arange(len(ids)))
    for d in (1.0, 0.5, 1 / 256):
        out = pos(np.arange(10, 50), d)
        np.testing.assert_array_equal(out, np.arange(40))
        assert out.dtype == np.float64
    assert pos(np.zeros(0, dtype=np.int64), 0.5).shape == (0,)
    assert pos(np.zeros((2, 0), dtype=np.int64), 0.5).shape == (2, 0)


def test_multi_image_different_deltas_per_image():
    ids = [1] + image(3) + [2, 2] + image(5) + image(4) + [3]
    deltas = [0.5, 1 / 256, 1.0]
    got = pos(ids, deltas)
    np.testing.assert_array_equal(got, reference_positions(ids, deltas))
    # Hand check: <img>@1, 1.5 2 2.5, </img>@ceil(2.5)+1=4, text 5 6, <img>@7, 7+k/256, </img>@9, ...
    assert got[:5].tolist() == [0, 1, 1.5, 2, 2.5]
    assert got[5:9].tolist() == [4, 5, 6, 7]
    assert got[14] == 9 and got[15] == 10
    assert got[-1] == 16


def test_general_delta_ceiling_snaps():
    # 0.7 * 10 == 7.000000000000001 in float64: a plain ceil would give 8 and </img> at 10.
    got = pos(image(10), 0.7)
    assert got[-1] == 8.0
    # 0.1 * 3 == 0.30000000000000004 is genuinely fractional: ceil -> 1, </img> at 2.
    assert pos(image(3), 0.1)[-1] == 2.0


def test_torch_input_and_batching():
    rows = [
        [1, 2] + image(4) + [3] + image(2),
        image(3) + [1] * 8,
        [5] * 13,
    ]
    ids = torch.tensor(rows)
    per_row = [[0.25, 0.5], [1 / 8], []]
    got = pos(ids, per_row)
    assert got.shape == (3, 13) and got.dtype == np.float64
    for b, row in enumerate(rows):
        np.testing.assert_array_equal(got[b], reference_positions(row, per_row[b]))
    # The same deltas flat, in row-major image order.
    np.testing.assert_array_equal(pos(ids, [0.25, 0.5, 1 / 8]), got)
    # One float for all images.
    for b, row in enumerate(rows):
        np.testing.assert_array_equal(pos(ids, 0.5)[b], reference_positions(row, [0.5] * 2))


def random_sample(rng: np.random.Generator) -> tuple[list[int], list[float]]:
    ids: list[int] = []
    deltas: list[float] = []
    for _ in range(rng.integers(0, 6)):
        ids += [int(t) for t in rng.integers(0, 1000, rng.integers(0, 7))]
        ids += image(int(rng.integers(0, 40)))
        deltas.append(float(rng.choice([1.0, 0.5, 0.25, 1 / 256, 0.1, 0.3, 0.7, 2 / 3, 1 / 3])))
    ids += [int(t) for t in rng.integers(0, 1000, rng.integers(0, 4))]
    return ids, deltas


# The position pass runs in chunks of v2pe._CHUNK tokens; small chunks cut segments everywhere.
@pytest.mark.parametrize("chunk", [None, 7, 1])
def test_matches_independent_reference_on_random_inputs(chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(v2pe, "_CHUNK", chunk)
    rng = np.random.default_rng(0)
    for trial in range(30):
        ids, deltas = random_sample(rng)
        np.testing.assert_array_equal(pos(np.array(ids, dtype=np.int64), deltas), reference_positions(ids, deltas),
                                      err_msg=f"trial {trial}")
    # Batches: rows padded with text to a common length, deltas given per row.
    for trial in range(10):
        samples = [random_sample(rng) for _ in range(int(rng.integers(1, 5)))]
        width = max(len(ids) for ids, _ in samples) + int(rng.integers(0, 3))
        rows = [ids + [0] * (width - len(ids)) for ids, _ in samples]
        got = pos(np.array(rows, dtype=np.int64).reshape(len(rows), width), [d for _, d in samples])
        for b, (row, (_, d)) in enumerate(zip(rows, samples)):
            np.testing.assert_array_equal(got[b], reference_positions(row, d), err_msg=f"trial {trial} row {b}")


@pytest.mark.parametrize("ids, match", [
    ([1, E, 2], r"</img> at index 1 has no matching <img>"),
    ([1, S, C, E, E], r"</img> at index 4 has no matching <img>"),
    ([S, C, S, C, E, E], r"nested <img> at index 2"),
    ([1, S, C, C], r"<img> at index 1 is never closed"),
    ([1, C, S, C, E], r"<IMG_CONTEXT> token at index 1 is outside"),
    ([S, C, E, C], r"<IMG_CONTEXT> token at index 3 is outside"),
    ([S, C, 7, C, E], r"token id 7 at index 2 lies inside an image"),
])
def test_malformed_markup(ids, match, monkeypatch):
    with pytest.raises(ValueError, match=match):
        pos(ids, 0.5)
    monkeypatch.setattr(v2pe, "_CHUNK", 2)  # faults found in a later chunk are reported the same way
    with pytest.raises(ValueError, match=match):
        pos(ids, 0.5)


def test_malformed_markup_batched_names_the_row():
    ids = np.array([image(2) + [1], [1, S, C, C, 2]])
    with pytest.raises(ValueError, match=r"row 1, index 1 is never closed"):
        pos(ids, 0.5)


@pytest.mark.parametrize("delta", [0.0, -0.25, 1.5, float("nan"), [0.5, 2.0], [0.5, 0.0]])
def test_delta_out_of_range(delta):
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\]"):
        pos(image(2) + [1] + image(3), delta)


def test_wrong_number_of_deltas():
    ids = image(2) + [1] + image(3)
    with pytest.raises(ValueError, match=r"3 delta\(s\) given for 2 image\(s\)"):
        pos(ids, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"1 delta\(s\) given for 2 image\(s\)"):
        pos(ids, [0.5])
    batch = np.array([ids, ids])
    with pytest.raises(ValueError, match=r"row 1 has 2 image\(s\) but 1 delta\(s\)"):
        pos(batch, [[0.5, 0.5], [0.5]])
    with pytest.raises(ValueError, match=r"per row \(3 rows\) but input_ids has 2 rows"):
        pos(batch, [[0.5, 0.5], [0.5, 0.5], []])


def test_bad_input_shape_and_dtype():
    with pytest.raises(ValueError, match="1-D"):
        pos(np.zeros((1, 2, 3), dtype=np.int64), 0.5)
    with pytest.raises(ValueError, match="integers"):
        pos(np.zeros(3, dtype=np.float32), 0.5)


# ---------------------------------------------------------------------------------------------
# Delta policies
# ---------------------------------------------------------------------------------------------
def test_default_and_fixed_policies():
    p = make_delta_policy(V2PEConfig(policy="default"))
    assert isinstance(p, DefaultDeltaPolicy)
    np.testing.assert_array_equal(p.deltas(3, 0), [1.0, 1.0, 1.0])
    p = make_delta_policy(V2PEConfig(policy="fixed", delta=0.25))
    assert isinstance(p, FixedDeltaPolicy)
    d = p.deltas(4, 17)
    assert d.dtype == np.float64 and d.tolist() == [0.25] * 4
    assert p.deltas(0, 1).shape == (0,)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        make_delta_policy(V2PEConfig(policy="fixed", delta=0.0))
    with pytest.raises(ValueError, match="not one of"):
        make_delta_policy(V2PEConfig(policy="linear"))


def test_random_policy_deterministic_per_sample():
    cfg = V2PEConfig(policy="random", seed=7)
    p = make_delta_policy(cfg)
    assert isinstance(p, RandomDeltaPolicy)
    a = p.deltas(16, 123)
    # A fresh policy (as after a resume) and draws in another order give the same values.
    q = make_delta_policy(cfg)
    q.deltas(5, 999)
    np.testing.assert_array_equal(q.deltas(16, 123), a)
    np.testing.assert_array_equal(p.deltas(16, 123), a)
    # Different samples / seeds differ.
    assert not np.array_equal(p.deltas(16, 124), a)
    assert not np.array_equal(make_delta_policy(V2PEConfig(policy="random", seed=8)).deltas(16, 123), a)
    # The global RNGs are not used (nor disturbed).
    np.random.seed(0)
    before = np.random.random()
    np.random.seed(0)
    p.deltas(16, 5)
    assert np.random.random() == before
    assert a.dtype == np.float64 and set(a.tolist()) <= set(DEFAULT_DELTA_SET)


def test_random_policy_covers_the_set_uniformly():
    p = RandomDeltaPolicy(DEFAULT_DELTA_SET, seed=1)
    draws = np.concatenate([p.deltas(10, key) for key in range(1000)])
    values, counts = np.unique(draws, return_counts=True)
    assert set(values.tolist()) == set(DEFAULT_DELTA_SET)
    expected = draws.size / len(DEFAULT_DELTA_SET)
    assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected))  # ~1111 +- 33 each
    custom = RandomDeltaPolicy([0.5, 0.125], seed=3)
    assert set(np.concatenate([custom.deltas(4, k) for k in range(50)]).tolist()) == {0.5, 0.125}


def test_random_policy_rejects_bad_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        RandomDeltaPolicy([], seed=0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        RandomDeltaPolicy([0.5, 2.0], seed=0)
    with pytest.raises(ValueError, match="sample_key"):
        RandomDeltaPolicy([0.5], seed=0).deltas(2, -1)
    with pytest.raises(ValueError, match="num_images"):
        RandomDeltaPolicy([0.5], seed=0).deltas(-1, 0)


def test_policy_deltas_feed_positions():
    p = make_delta_policy(V2PEConfig(policy="random", seed=3))
    ids = [1] + image(256) + [2] + image(512) + [3]
    d = p.deltas(2, 42)
    np.testing.assert_array_equal(pos(ids, d), reference_positions(ids, d.tolist()))


def test_recipe_keys_build_the_policy():
    from v2pe_megatron.config import RecipeError, load_recipe

    recipe = load_recipe(overrides=["v2pe.policy=random", "v2pe.delta_set=[0.5,0.125]", "v2pe.seed=9"])
    p = make_delta_policy(recipe.v2pe)
    assert isinstance(p, RandomDeltaPolicy) and p.seed == 9 and p.delta_set.tolist() == [0.5, 0.125]
    assert isinstance(make_delta_policy(load_recipe(overrides=["v2pe.policy=fixed", "v2pe.delta=0.25"]).v2pe),
                      FixedDeltaPolicy)
    for bad, msg in ((["v2pe.seed=-1"], "v2pe.seed=-1 must be >= 0"), (["v2pe.delta=1.5"], r"v2pe.delta=1.5"),
                     (["v2pe.delta_set=[0.5,0]"], "v2pe.delta_set"), (["v2pe.policy=rnd"], "v2pe.policy")):
        with pytest.raises(RecipeError, match=msg):
            load_recipe(overrides=bad)
