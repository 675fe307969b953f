"""Synthetic InternVL-format data: captioning, multi-image, text-only and needle-in-a-haystack samples
(a text needle among images, and an image needle among distractor images).

Images are drawn shapes on plain or noisy backgrounds, so answers are checkable from the pixels.
The same records are held in memory (``synth_records``: the default data of ``make demo``) or
written to disk as a meta file + jsonl + image files, or as webdataset shards (``write_synthetic``).
``fit_to_recipe`` sizes them for a recipe (``v2pe-data synth --recipe``): images of the recipe's
tile size, and haystacks as long as every sample still fits ``data.seq_length`` whole, checked
sample by sample with the loader's own tokenization and tiling.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from v2pe_megatron.config import Recipe
    from v2pe_megatron.data.tokenizer import Tokenizer

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
          "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("square", "circle")
_WORDS = ("the quick brown fox jumps over a lazy dog while the river runs past old stone houses and "
          "people talk about weather markets music travel books gardens trains rain sun light").split()


def draw_image(rng: np.random.Generator, width: int, height: int, color: str, shape: str,
               noisy: bool = False) -> np.ndarray:
    bg = np.array(COLORS["black" if color == "white" else "white"], np.float32)
    img = np.broadcast_to(bg, (height, width, 3)).copy()
    if noisy:
        img = np.clip(img * 0.6 + rng.normal(60, 40, img.shape), 0, 255)
    cy, cx, r = height / 2, width / 2, min(width, height) * 0.3
    yy, xx = np.mgrid[0:height, 0:width]
    if shape == "square":
        mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    elif shape == "diamond":  # the training split's needle shape (data.needles.SPLITS)
        mask = np.abs(yy - cy) + np.abs(xx - cx) <= r * 1.3
    else:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img[mask] = COLORS[color]
    return img.astype(np.uint8)


def encode_image(arr: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG" if fmt == "jpg" else "PNG", **({"quality": 90} if fmt == "jpg" else {}))
    return buf.getvalue()


def _haystack(rng: np.random.Generator, n_words: int) -> list[str]:
    words = rng.choice(_WORDS, size=max(n_words, 1))
    sents, k = [], 0
    while k < len(words):
        m = int(rng.integers(6, 14))
        sents.append(" ".join(words[k: k + m]).capitalize() + ".")
        k += m
    return sents


def synth_records(num_samples: int, seed: int = 0, *, min_side: int = 24, max_side: int = 96,
                  haystack_words: int = 60, max_images: int = 3) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """(records, images by name). Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    records: list[dict[str, Any]] = []
    images: dict[str, bytes] = {}

    def new_image(color: str, shape: str, noisy: bool = False) -> str:
        w, h = (int(x) for x in rng.integers(min_side, max_side + 1, size=2))
        fmt = "jpg" if rng.random() < 0.5 else "png"
        name = f"img_{len(images):06d}.{fmt}"
        images[name] = encode_image(draw_image(rng, w, h, color, shape, noisy), fmt)
        return name

    kinds = ("caption", "multi", "text", "niah_text", "niah_image")
    for i in range(num_samples):
        kind = kinds[i % len(kinds)] if max_images > 0 else "text"
        color, shape = str(rng.choice(list(COLORS)[:4])), str(rng.choice(SHAPES))
        if kind == "caption":
            names = [new_image(color, shape)]
            conv = [{"from": "human", "value": "<image>\nWhat is in the image?"},
                    {"from": "gpt", "value": f"A {color} {shape}."}]
        elif kind == "multi":
            n = int(rng.integers(2, max(3, max_images + 1)))
            specs = [(str(rng.choice(list(COLORS)[:4])), str(rng.choice(SHAPES))) for _ in range(n)]
            names = [new_image(c, s) for c, s in specs]
            q = "".join(f"Image {k + 1}: <image>\n" for k in range(n)) + "Name the shapes in order."
            conv = [{"from": "human", "value": q},
                    {"from": "gpt", "value": ", ".join(f"{c} {s}" for c, s in specs) + "."}]
        elif kind == "text":
            names = []
            a, b = (int(x) for x in rng.integers(1, 50, size=2))
            conv = [{"from": "human", "value": f"What is {a} plus {b}?"},
                    {"from": "gpt", "value": f"{a} plus {b} is {a + b}."}]
        elif kind == "niah_text":
            hay = _haystack(rng, haystack_words)
            secret = int(rng.integers(1000, 9999))
            depth = int(rng.integers(0, len(hay) + 1))
            hay.insert(depth, f"The secret number is {secret}.")
            n_img = int(rng.integers(1, max_images + 1))
            for _ in range(n_img):  # images as distractors at random places in the haystack
                hay.insert(int(rng.integers(0, len(hay) + 1)), "<image>")
            names = [new_image(str(rng.choice(list(COLORS)[:4])), str(rng.choice(SHAPES)), True)
                     for _ in range(n_img)]
            conv = [{"from": "human", "value": " ".join(hay) + "\nWhat is the secret number?"},
                    {"from": "gpt", "value": f"The secret number is {secret}."}]
        else:  # niah_image: one red circle among noisy distractors
            n = int(rng.integers(2, max(3, max_images + 1)))
            needle = int(rng.integers(0, n))
            hay = _haystack(rng, haystack_words)
            names = []
            parts = []
            for k in range(n):
                if k == needle:
                    names.append(new_image("red", "circle"))
                else:
                    names.append(new_image(str(rng.choice(["green", "blue", "yellow"])), "square", True))
                parts.append(" ".join(hay[k::n]) + f" Image {k + 1}: <image>")
            conv = [{"from": "human", "value": " ".join(parts) + "\nWhich image shows a red circle?"},
                    {"from": "gpt", "value": f"Image {needle + 1}."}]
        rec: dict[str, Any] = {"id": f"synth-{i:06d}-{kind}", "conversations": conv}
        if names:
            rec["image"] = names[0] if len(names) == 1 else names
        records.append(rec)
    return records, images


def synthetic_image_sides(image_size: int) -> tuple[int, int]:
    """(min_side, max_side) of synthetic images for a model of ``image_size`` px tiles: from half a
    tile to two tiles across, so samples get one to a few tiles (and a thumbnail)."""
    return max(8, image_size // 2), 2 * image_size


def sample_lengths(records: list[dict[str, Any]], images: dict[str, bytes], recipe: "Recipe",
                   tok: "Tokenizer") -> list[tuple[int, int]]:
    """(tokens, tiles) of each record as the recipe's loader would see it, before any truncation."""
    from v2pe_megatron.data.chat import chat_format, tokenize_sample
    from v2pe_megatron.data.tiling import image_size_of, sample_tiling

    d = recipe.data
    chat = chat_format(d)
    out = []
    for r in records:
        names = r.get("image", [])
        names = [names] if isinstance(names, str) else names
        _, tiles = sample_tiling([image_size_of(images[n]) for n in names], min_num=d.min_dynamic_patch,
                                 max_num=d.max_dynamic_patch, image_size=recipe.model.vision.image_size,
                                 use_thumbnail=d.use_thumbnail)
        tk = tokenize_sample(tok, conversations=r.get("conversations"), text=r.get("text"), tiles_per_image=tiles,
                             num_image_token=recipe.model.num_image_token, chat=chat)
        out.append((int(tk.ids.size), int(sum(tiles))))
    return out


@dataclass
class Fitted:
    """What :func:`fit_to_recipe` chose and what it proved."""

    records: list[dict[str, Any]]
    images: dict[str, bytes]
    sizes: dict[str, int]          # the synth_records keyword arguments used
    longest: int                   # tokens of the longest sample
    most_tiles: int                # tiles of the sample with the most
    too_long: int                  # samples that do not fit (only when a given size forces it)


# synth_records' keyword arguments for a long-context set (v2pe-data synth without a recipe)
DEFAULT_SIZES = {"min_side": 64, "max_side": 640, "haystack_words": 400, "max_images": 4}


def fit_to_recipe(recipe: "Recipe", num_samples: int, seed: int = 0, *, tokenizer: "Tokenizer | None" = None,
                  **given: int | None) -> Fitted:
    """Records sized for ``recipe``: every sample fits ``data.seq_length`` (after padding to the
    layout's multiple) and ``data.max_tiles_per_pack`` whole, so the loader neither truncates nor
    skips any.

    ``given`` (``min_side``, ``max_side``, ``haystack_words``, ``max_images``; None = choose) are kept
    as given. The image sides follow the recipe's tile size; the haystack starts at the longest that
    an estimate (the tokens of an average haystack word) allows, at most 400 words, and the image
    count at 4; both shrink until every sample fits. Fit is not estimated but checked: each sample is
    tokenized and tiled as the loader does it. When given sizes make that impossible, ``too_long``
    counts the samples that do not fit."""
    from v2pe_megatron.data.tokenizer import build_tokenizer
    from v2pe_megatron.parallel.layout import Layout

    d = recipe.data
    tok = tokenizer or build_tokenizer(d.tokenizer_path)
    limit = d.seq_length - (Layout.from_config(recipe.parallel).seq_multiple - 1)  # room for the padding
    lo_side, hi_side = synthetic_image_sides(recipe.model.vision.image_size)
    sizes = {"min_side": given.get("min_side") or lo_side, "max_side": given.get("max_side") or hi_side}
    sizes["max_side"] = max(sizes["max_side"], sizes["min_side"])
    images_given, words_given = given.get("max_images"), given.get("haystack_words")
    max_images = DEFAULT_SIZES["max_images"] if images_given is None else images_given
    if words_given is None:
        per_word = len(tok.encode(" ".join(_haystack(np.random.default_rng(seed), 400)))) / 400
        tiles = d.max_dynamic_patch + max(max_images, 1) * int(d.use_thumbnail)
        room = limit - tiles * recipe.model.num_image_token - 64  # 64: template, question and answer
        words = max(0, min(DEFAULT_SIZES["haystack_words"], int(room / per_word)))
    else:
        words = words_given
    while True:
        sizes.update(haystack_words=words, max_images=max_images)
        records, images = synth_records(num_samples, seed, **sizes)
        lengths = sample_lengths(records, images, recipe, tok)
        bad = sum(n > limit or t > d.max_tiles_per_pack for n, t in lengths)
        if not bad or (words_given is not None and images_given is not None):
            break
        if words_given is None and words > 0:
            words = words * 3 // 4
        elif images_given is None and max_images > 0:
            max_images -= 1
        else:
            break
    return Fitted(records, images, dict(sizes), max((n for n, _ in lengths), default=0),
                  max((t for _, t in lengths), default=0), bad)


def write_synthetic(out_dir: str | Path, num_samples: int, seed: int = 0, *, fmt: str = "jsonl",
                    shard_size: int = 64, records: tuple[list[dict[str, Any]], dict[str, bytes]] | None = None,
                    **kwargs: Any) -> Path:
    """Write a dataset and its meta file under ``out_dir``; returns the meta file's path.

    ``fmt``: ``jsonl`` (meta + annotation + image files) or ``webdataset`` (tar shards whose
    ``<key>.json`` is the record and ``<key>.<k>.<ext>`` its images). ``records``: (records, images)
    made already (e.g. by :func:`fit_to_recipe`) instead of ``synth_records(num_samples, seed, **kwargs)``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, images = records if records is not None else synth_records(num_samples, seed, **kwargs)
    if fmt == "jsonl":
        (out / "images").mkdir(exist_ok=True)
        for name, data in images.items():
            (out / "images" / name).write_bytes(data)
        with open(out / "data.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        meta = {"synthetic": {"root": "images", "annotation": "data.jsonl", "repeat_time": 1,
                              "length": len(records), "data_augment": False}}
    elif fmt == "webdataset":
        (out / "shards").mkdir(exist_ok=True)
        n_shards = max(1, -(-len(records) // shard_size))
        for s in range(n_shards):
            with tarfile.open(out / "shards" / f"{s:06d}.tar", "w") as tf:
                for r in records[s * shard_size: (s + 1) * shard_size]:
                    key = r["id"]
                    names = r.get("image", [])
                    names = [names] if isinstance(names, str) else names
                    rec = dict(r)
                    suffixes = [f"{k}.{n.rsplit('.', 1)[-1]}" for k, n in enumerate(names)]
                    if names:
                        rec["image"] = suffixes
                    members = [(f"{key}.json", json.dumps(rec).encode())]
                    members += [(f"{key}.{sfx}", images[n]) for sfx, n in zip(suffixes, names)]
                    for mname, data in members:
                        ti = tarfile.TarInfo(mname)
                        ti.size = len(data)
                        tf.addfile(ti, io.BytesIO(data))
        pattern = f"shards/{{{0:06d}..{n_shards - 1:06d}}}.tar" if n_shards > 1 else "shards/000000.tar"
        meta = {"synthetic_wds": {"annotation": pattern, "format": "webdataset", "repeat_time": 1,
                                  "length": len(records)}}
    else:
        raise ValueError(f"fmt must be jsonl or webdataset, got {fmt!r}")
    meta_path = out / "meta.json"
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta_path
