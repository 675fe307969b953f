"""Benchmark: V2PE positions for a million-token sample, vectorized vs a per-image Python loop.

Run: ``.venv/bin/python benchmarks/v2pe_positions.py`` (pins itself to one CPU core).

The sample has 1,048,576 tokens: 4,000 images of 256 visual tokens each (plus their <img>/</img>)
with the remaining text tokens spread between them, and one delta per image drawn by the random
policy. The vectorized :func:`compute_position_ids` must take < 50 ms; the loop is the reference's
approach (walk the images, arange the text between them, place the visual tokens, ceil).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from v2pe_megatron.config import V2PEConfig  # noqa: E402
from v2pe_megatron.v2pe import compute_position_ids, make_delta_policy  # noqa: E402

IMG_START, IMG_END, IMG_CONTEXT, TEXT = 92544, 92545, 92546, 1000
BUDGET_MS = 50.0


def make_sample(num_tokens: int, num_images: int, tokens_per_image: int, seed: int = 0) -> np.ndarray:
    text = num_tokens - num_images * (tokens_per_image + 2)
    if text < 0:
        raise SystemExit(f"{num_images} images of {tokens_per_image} tokens do not fit in {num_tokens} tokens")
    rng = np.random.default_rng(seed)
    # Text run lengths before each image and after the last one, summing to `text`.
    cuts = np.sort(rng.integers(0, text + 1, num_images))
    runs = np.diff(np.concatenate([[0], cuts, [text]]))
    image = np.array([IMG_START] + [IMG_CONTEXT] * tokens_per_image + [IMG_END], dtype=np.int64)
    parts: list[np.ndarray] = []
    for run in runs[:-1]:
        parts += [np.full(run, TEXT, dtype=np.int64), image]
    parts.append(np.full(runs[-1], TEXT, dtype=np.int64))
    ids = np.concatenate(parts)
    assert ids.size == num_tokens
    return ids


def loop_positions(ids: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """The straightforward approach: one Python iteration per image."""
    starts = np.flatnonzero(ids == IMG_START)
    ends = np.flatnonzero(ids == IMG_END)
    out = np.empty(ids.size, dtype=np.float64)
    next_pos = 0  # position of the next text / <img> token
    prev = 0  # first token index not yet placed
    for j, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        out[prev:s + 1] = np.arange(next_pos, next_pos + s + 1 - prev, dtype=np.float64)
        img_pos = next_pos + s - prev
        n = e - s - 1
        out[s + 1:e] = img_pos + deltas[j] * np.arange(1, n + 1, dtype=np.float64)
        out[e] = math.ceil(img_pos + deltas[j] * n) + 1
        next_pos = int(out[e]) + 1
        prev = e + 1
    out[prev:] = np.arange(next_pos, next_pos + ids.size - prev, dtype=np.float64)
    return out


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--tokens-per-image", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--loop-repeats", type=int, default=5)
    args = ap.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    ids = make_sample(args.tokens, args.images, args.tokens_per_image)
    deltas = make_delta_policy(V2PEConfig(policy="random", seed=1234)).deltas(args.images, sample_key=0)

    def vectorized() -> np.ndarray:
        return compute_position_ids(ids, img_start_id=IMG_START, img_end_id=IMG_END,
                                    img_context_id=IMG_CONTEXT, delta=deltas)

    fast, slow = vectorized(), loop_positions(ids, deltas)
    np.testing.assert_array_equal(fast, slow)  # same rule, bit for bit
    t_vec = median_ms(vectorized, args.repeats)
    t_loop = median_ms(lambda: loop_positions(ids, deltas), args.loop_repeats)

    print(f"sample: {ids.size:,} tokens, {args.images:,} images x {args.tokens_per_image} visual tokens, "
          f"random deltas, last position {fast[-1]:.0f}; pinned to CPU {sorted(os.sched_getaffinity(0))}")
    print(f"vectorized compute_position_ids: median {t_vec:.1f} ms over {args.repeats} runs "
          f"(budget {BUDGET_MS:.0f} ms: {'OK' if t_vec < BUDGET_MS else 'OVER'})")
    print(f"per-image Python loop:           median {t_loop:.1f} ms over {args.loop_repeats} runs")
    print(f"speed-up: {t_loop / t_vec:.1f}x; outputs identical: yes")
    if t_vec >= BUDGET_MS:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
