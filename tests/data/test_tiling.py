"""Dynamic tiling: the grid rule against a plain transcription of InternVL's code, DALI pixels against
the Pillow reference on real photographs, the Pillow tiler (used without DALI) against DALI, and
corrupt images failing alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from v2pe_megatron.data.tiling import (
    IMAGENET_STD, DaliTiler, ImageDecodeError, PillowTiler, choose_grid, image_size_of, pillow_tiles, tiles_for)


def _internvl_grid(width, height, min_num, max_num, image_size):
    """InternVL's dynamic_preprocess / find_closest_aspect_ratio, transcribed line by line."""
    aspect_ratio = width / height
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def test_grid_rule_matches_internvl_on_many_sizes():
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 5000, size=(3000, 2))]
    # Exact ties: aspect ratios halfway between candidates (e.g. 1.25 between 2:1 and 1:2 ... ) and
    # exact candidate ratios at both sides of the area threshold.
    for s in (10, 100, 224, 300, 448, 449, 700, 1000, 2000):
        sizes += [(s, s), (2 * s, s), (s, 2 * s), (3 * s, 2 * s),
                  (5 * s, 4 * s), (4 * s, 5 * s), (3 * s, s), (5 * s, 2 * s), (s, 7 * s)]
    checked = 0
    ties = 0
    for min_num, max_num, isz in ((1, 12, 448), (1, 6, 448), (1, 5, 448), (2, 9, 448), (1, 4, 56), (1, 1, 448),
                                  (1, 2, 448), (1, 3, 448)):
        for w, h in sizes:
            diffs = sorted(abs(w / h - c / r) for c in range(1, max_num + 1) for r in range(1, max_num + 1)
                           if min_num <= c * r <= max_num)
            ties += len(diffs) > 1 and diffs[0] == diffs[1]
            assert choose_grid(w, h, min_num=min_num, max_num=max_num, image_size=isz) == \
                _internvl_grid(w, h, min_num, max_num, isz), (w, h, min_num, max_num, isz)
            checked += 1
    assert checked > 15000
    assert ties > 50  # the tie-break path is exercised, not only clear winners


def test_grid_tie_cases_are_decided_like_internvl():
    # 1.25 is equidistant from 2:1 and 1:2 (both 2 tiles): the set order and the area rule decide.
    for w, h in ((1250, 1000), (125, 100), (5, 4), (3000, 2400)):
        assert choose_grid(w, h, min_num=1, max_num=12, image_size=448) == _internvl_grid(w, h, 1, 12, 448)
    # Square images: small ones stay 1x1, large ones move to the larger square grid.
    assert choose_grid(300, 300, min_num=1, max_num=12, image_size=448) == (1, 1)
    assert choose_grid(2000, 2000, min_num=1, max_num=12, image_size=448) == (3, 3)


def test_tiles_for_counts_thumbnail_only_for_multi_tile():
    assert tiles_for((1, 1), True) == 1
    assert tiles_for((3, 2), True) == 7
    assert tiles_for((3, 2), False) == 6


def _encode(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos():
    from skimage import data

    gray = data.camera()
    return {"astronaut.jpg": _encode(data.astronaut(), "JPEG"), "chelsea.png": _encode(data.chelsea(), "PNG"),
            "coffee.jpg": _encode(data.coffee(), "JPEG"), "camera_gray.png": _encode(gray, "PNG"),
            "rocket.jpg": _encode(data.rocket(), "JPEG")}


def test_dali_matches_pillow_reference_448(photos):
    s = 448
    names = ["astronaut.jpg", "chelsea.png", "camera_gray.png"]
    enc = [photos[n] for n in names]
    grids = [choose_grid(*image_size_of(e), min_num=1, max_num=4, image_size=s) for e in enc]
    assert grids != [(1, 1)] * len(grids)
    out = DaliTiler(s, max_batch=4)(enc, grids)
    for name, e, g, o in zip(names, enc, grids, out):
        ref = pillow_tiles(Image.open(io.BytesIO(e)), g, s, True)
        assert o.shape == ref.shape == (tiles_for(g, True), 3, s, s), name
        assert o.dtype == np.float32
        # back to 0..255 pixel units
        diff = np.abs(o - ref) * np.asarray(IMAGENET_STD, np.float32)[:, None, None] * 255
        assert diff.mean() < 1.0, (name, diff.mean())


def test_dali_tiles_row_major_and_thumbnail_small(photos):
    s = 56
    enc = [photos["rocket.jpg"], photos["coffee.jpg"]]
    grids = [(3, 2), (1, 1)]
    a, b = DaliTiler(s, max_batch=2)(enc, grids)
    assert a.shape == (7, 3, s, s) and b.shape == (1, 3, s, s)
    ref = pillow_tiles(Image.open(io.BytesIO(enc[0])), (3, 2), s, True)
    per_tile = (np.abs(a - ref) * np.asarray(IMAGENET_STD, np.float32)[:, None, None] * 255).mean(axis=(1, 2, 3))
    assert per_tile.max() < 2.0  # every tile (in row-major order) and the thumbnail line up
    (c,) = DaliTiler(s, use_thumbnail=False)([enc[0]], [(3, 2)])
    np.testing.assert_array_equal(c, a[:6])


def _pixel_units(a):
    return np.abs(a) * np.asarray(IMAGENET_STD, np.float32)[:, None, None] * 255


@pytest.mark.parametrize("use_thumbnail", [True, False])
def test_pillow_tiler_matches_dali(photos, use_thumbnail):
    s = 56
    names = ["astronaut.jpg", "chelsea.png", "coffee.jpg", "camera_gray.png", "rocket.jpg"]
    enc = [photos[n] for n in names]
    grids = [choose_grid(*image_size_of(e), min_num=1, max_num=6, image_size=s) for e in enc] + [(1, 1), (2, 3)]
    enc += [photos["coffee.jpg"], photos["rocket.jpg"]]
    assert len(set(grids)) >= 3
    pil = PillowTiler(s, use_thumbnail=use_thumbnail)(enc, grids)
    dali = DaliTiler(s, use_thumbnail=use_thumbnail, max_batch=3)(enc, grids)
    for e, g, p, d in zip(enc, grids, pil, dali):
        assert p.shape == d.shape == (tiles_for(g, use_thumbnail), 3, s, s) and p.dtype == np.float32
        np.testing.assert_array_equal(p, pillow_tiles(Image.open(io.BytesIO(e)), g, s, use_thumbnail))
        per_tile = _pixel_units(p - d).mean(axis=(1, 2, 3))
        assert per_tile.max() < 2.0, (g, per_tile)
    # encoded images given as uint8 arrays, as DALI also takes them
    (again,) = PillowTiler(s, use_thumbnail=use_thumbnail)([np.frombuffer(enc[0], np.uint8)], grids[:1])
    np.testing.assert_array_equal(again, pil[0])


@pytest.mark.parametrize("tiler_cls", [DaliTiler, PillowTiler])
def test_corrupt_image_fails_alone(photos, tiler_cls):
    good = photos["astronaut.jpg"]
    truncated = good[: len(good) // 3]
    garbage = b"this is not an image at all" * 4
    tiler = tiler_cls(56, max_batch=4)
    out = tiler([good, truncated, garbage, photos["chelsea.png"]], [(1, 1), (1, 1), (1, 1), (2, 1)])
    assert isinstance(out[1], ImageDecodeError) and isinstance(out[2], ImageDecodeError)
    assert out[0].shape == (1, 3, 56, 56) and out[3].shape == (3, 3, 56, 56)
    # and the pipeline keeps working afterwards
    (again,) = tiler([good], [(1, 1)])
    np.testing.assert_array_equal(again, out[0])
    with pytest.raises(ImageDecodeError):
        image_size_of(garbage)


@pytest.mark.gpu
def test_mixed_gpu_decode_matches_cpu(photos):
    from v2pe_megatron.data.tiling import cuda_available

    if not cuda_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("nvidia.dali", reason="needs nvidia-dali")
    enc = [photos["astronaut.jpg"], photos["coffee.jpg"]]
    grids = [(2, 2), (3, 2)]
    cpu = DaliTiler(56, device="cpu")(enc, grids)
    gpu = DaliTiler(56, device="gpu")(enc, grids)
    for c, g in zip(cpu, gpu):
        assert c.shape == g.shape
        # nvJPEG and libjpeg-turbo may differ by an IDCT rounding; resize on GPU is float too
        assert (np.abs(c - g) * np.asarray(IMAGENET_STD, np.float32)[:, None, None] * 255).mean() < 1.0


def _as(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_pillow_fallback_gives_dalis_tiles(photos, monkeypatch):
    # The same images through DALI and, forced, through the fallback: InternVL's grid, resize and
    # tile order either way, within the resampling tolerance the tests above use.
    from v2pe_megatron.data import tiling

    s = 56
    enc = [photos["chelsea.png"], photos["rocket.jpg"], photos["camera_gray.png"]]
    grids = [(3, 2), (2, 1), (1, 1)]
    dali = DaliTiler(s, max_batch=4)(enc, grids)
    monkeypatch.setattr(tiling, "pillow_only_reason", lambda data: "forced")
    got: list = []
    fell = DaliTiler(s, max_batch=4)(enc, grids, fallbacks=got)
    assert got == [(0, "forced"), (1, "forced"), (2, "forced")]
    for e, g, d, f in zip(enc, grids, dali, fell):
        assert f.shape == d.shape == (tiles_for(g, True), 3, s, s) and f.dtype == np.float32
        np.testing.assert_array_equal(f, pillow_tiles(Image.open(io.BytesIO(e)), g, s, True))
        assert _pixel_units(f - d).mean(axis=(1, 2, 3)).max() < 2.0


def test_images_dali_cannot_decode_go_to_pillow_alone(photos, monkeypatch):
    # Before: an animated GIF or a 32-bit TIFF was an ImageDecodeError ("Critical error in pipeline:").
    from v2pe_megatron.data import tiling

    s = 56
    photo = Image.open(io.BytesIO(photos["astronaut.jpg"])).resize((96, 64))
    gif = _as(photo, "GIF", save_all=True, append_images=[photo.rotate(90), photo.rotate(180)])
    frame0 = _as(Image.open(io.BytesIO(gif)).convert("RGB"), "PNG")  # what Pillow (InternVL) reads of it
    gray = np.asarray(photo.convert("L"), np.int32)
    int32 = _as(Image.fromarray(gray), "TIFF")  # mode I: 32-bit integer pixels
    deep = _as(Image.fromarray((gray * 300).astype(np.uint16)), "PNG")  # 16-bit: convert("RGB") clips
    enc = [photos["rocket.jpg"], gif, int32, deep, frame0, _as(photo.convert("L"), "PNG")]
    grids = [(2, 1)] * len(enc)
    got: list = []
    out = DaliTiler(s, max_batch=8)(enc, grids, fallbacks=got)
    assert got == [(1, "DALI cannot decode GIF"), (2, "TIFF with I pixels (DALI would rescale what Pillow clips)"),
                   (3, "PNG with I;16 pixels (DALI would rescale what Pillow clips)")]
    for e, o in zip(enc[1:4], out[1:4]):
        np.testing.assert_array_equal(o, pillow_tiles(Image.open(io.BytesIO(e)), (2, 1), s, True))
    # the fallback's tiles are DALI's tiles of the same pixels (frame 0 / the 8-bit gray image)
    assert _pixel_units(out[1] - out[4]).mean(axis=(1, 2, 3)).max() < 2.0
    assert _pixel_units(out[2] - out[5]).mean(axis=(1, 2, 3)).max() < 2.0
    # DALI decodes the 16-bit PNG, but rescaled: not InternVL's tiles (hence the header rule)
    (rescaled,) = DaliTiler(s)._run([np.frombuffer(deep, np.uint8)], [(2, 1)])
    assert _pixel_units(rescaled - out[3]).mean() > 20
    # An image DALI fails on at decode time takes the fallback too, with DALI's reason.
    monkeypatch.setattr(tiling, "pillow_only_reason", lambda data: "")
    got = []
    again = DaliTiler(s, max_batch=8)(enc[:2], grids[:2], fallbacks=got)
    assert [i for i, _ in got] == [1] and got[0][1].startswith("DALI: ") and "Critical error" not in got[0][1]
    np.testing.assert_array_equal(again[1], out[1])
    np.testing.assert_array_equal(again[0], out[0])


def test_a_decode_error_keeps_dalis_reason():
    from v2pe_megatron.data.tiling import dali_reason

    err = RuntimeError("Critical error in pipeline:\nCritical error in pipeline:\nError in CPU operator "
                       "`nvidia.dali.fn.decoders.image`,\nwhich was used in the pipeline definition with the "
                       "following traceback:\n\n  File \"x.py\", line 1, in tiling\n\nencountered:\n\n"
                       "Invalid sample_type: 8197\nCurrent pipeline object is no longer valid.\n")
    assert dali_reason(err) == "Invalid sample_type: 8197"


def test_the_other_formats_dali_decodes_like_pillow_stay_on_dali():
    # At the image's own size (no resampling) DALI's decode is Pillow's convert("RGB"), bit for bit:
    # these need no fallback (CMYK, palette + transparency, alpha, 1-bit, WebP incl. animated, ...).
    from v2pe_megatron.data.tiling import pillow_only_reason

    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    other = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    cases = {"cmyk.jpg": _as(base.convert("CMYK"), "JPEG"), "cmyk.tif": _as(base.convert("CMYK"), "TIFF"),
             "palette_transparent.png": _as(base.convert("P"), "PNG", transparency=0),
             "rgba.png": _as(base.convert("RGBA"), "PNG"), "la.png": _as(base.convert("LA"), "PNG"),
             "1bit.png": _as(base.convert("1"), "PNG"), "lossy.webp": _as(base, "WEBP"),
             "anim.webp": _as(base, "WEBP", save_all=True, append_images=[other], lossless=True),
             "palette.bmp": _as(base.convert("P"), "BMP"), "x.ppm": _as(base, "PPM"),
             "x.jp2": _as(base, "JPEG2000", irreversible=False)}
    tiler = DaliTiler(64)
    for name, e in cases.items():
        assert pillow_only_reason(e) == "", name
        got: list = []
        (d,) = tiler([e], [(1, 1)], fallbacks=got)
        assert got == [], name
        ref = pillow_tiles(Image.open(io.BytesIO(e)), (1, 1), 64, True)
        assert _pixel_units(d - ref).max() < 0.01, name
