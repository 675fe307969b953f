"""Plot V2PE position ids against token index, text vs visual tokens, one panel per delta.

    .venv/bin/python tools/plot_positions.py --out positions.png
    .venv/bin/python tools/plot_positions.py --deltas 1 1/4 1/16 1/256 --layout 40 256 30 512 20
    .venv/bin/python tools/plot_positions.py --input-ids sample.npy --out real.png   # a real sample

``--layout`` alternates text-run and image lengths (visual tokens per image): ``40 256 30 512 20`` is
40 text tokens, an image of 256 visual tokens, 30 text, 512 visual, 20 text.
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from v2pe_megatron.v2pe import compute_position_ids  # noqa: E402

# InternVL2-2B ids (docs/internvl.md); only their roles matter for a synthetic sample.
IMG_START, IMG_END, IMG_CONTEXT, TEXT = 92544, 92545, 92546, 1000


def parse_delta(text: str) -> float:
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError) as e:
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from e
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"delta must be in (0, 1], got {text}")
    return value


def synthetic_sample(layout: list[int]) -> np.ndarray:
    if not layout or any(n < 0 for n in layout):
        raise SystemExit("--layout needs non-negative lengths: text, image, text, image, ...")
    parts = []
    for i, n in enumerate(layout):
        if i % 2 == 0:
            parts.append(np.full(n, TEXT, dtype=np.int64))
        else:
            parts.append(np.array([IMG_START] + [IMG_CONTEXT] * n + [IMG_END], dtype=np.int64))
    return np.concatenate(parts)


def plot(ids: np.ndarray, deltas: list[float], out: Path, *, img_start_id: int, img_end_id: int,
         img_context_id: int, title: str) -> None:
    visual = ids == img_context_id
    index = np.arange(ids.size)
    fig, axes = plt.subplots(len(deltas), 1, figsize=(9, 2.3 * len(deltas) + 0.6), sharex=True, squeeze=False)
    for ax, delta in zip(axes[:, 0], deltas):
        pos = compute_position_ids(ids, img_start_id=img_start_id, img_end_id=img_end_id,
                                   img_context_id=img_context_id, delta=delta)
        ax.plot(index, pos, color="0.8", lw=0.8, zorder=1)
        ax.scatter(index[~visual], pos[~visual], s=4, color="tab:blue", label="text, <img>, </img>", zorder=2)
        ax.scatter(index[visual], pos[visual], s=2, color="tab:orange", label="visual", zorder=2)
        ax.plot(index, index, ls="--", lw=0.7, color="0.5", label="delta = 1 (arange)", zorder=0)
        ax.set_ylabel("position id")
        ax.set_title(f"delta = {Fraction(delta).limit_denominator(4096)}: last position {pos[-1]:g} "
                     f"for {ids.size} tokens", fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper left", fontsize=8, markerscale=3)
    axes[-1, 0].set_xlabel("token index")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Plot V2PE position ids vs token index for several deltas.")
    ap.add_argument("--out", type=Path, default=Path("v2pe_positions.png"), help="PNG to write")
    ap.add_argument("--deltas", type=parse_delta, nargs="+", default=[1.0, 1 / 4, 1 / 16, 1 / 256],
                    help="one panel per delta; fractions allowed (default: 1 1/4 1/16 1/256)")
    ap.add_argument("--layout", type=int, nargs="+", default=[40, 256, 30, 512, 20],
                    help="synthetic sample: text, image, text, image, ... lengths (default: 40 256 30 512 20)")
    ap.add_argument("--input-ids", type=Path, help="plot this sample instead (.npy or whitespace-separated ids)")
    ap.add_argument("--img-start-id", type=int, default=IMG_START)
    ap.add_argument("--img-end-id", type=int, default=IMG_END)
    ap.add_argument("--img-context-id", type=int, default=IMG_CONTEXT)
    args = ap.parse_args(argv)

    if args.input_ids is not None:
        p = args.input_ids
        ids = np.load(p) if p.suffix == ".npy" else np.loadtxt(p, dtype=np.int64).reshape(-1)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        title = f"V2PE positions: {p.name}"
    else:
        ids = synthetic_sample(args.layout)
        title = f"V2PE positions, synthetic sample (text/image lengths {' '.join(map(str, args.layout))})"
        args.img_start_id, args.img_end_id, args.img_context_id = IMG_START, IMG_END, IMG_CONTEXT
    try:
        plot(ids, args.deltas, args.out, img_start_id=args.img_start_id, img_end_id=args.img_end_id,
             img_context_id=args.img_context_id, title=title)
    except ValueError as e:
        raise SystemExit(f"cannot compute positions: {e}") from e
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
