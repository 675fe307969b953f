"""Images that used to crash the loader (and so every rank, and ``v2pe-data inspect``): a header that
claims 20000x20000 pixels (Pillow's DecompressionBombError) is now a counted ``oversized_image`` skip
decided from the header alone, with the limit a recipe key. Skip messages name the annotation file
and line, the sample id and the image file, never a ``BytesIO`` repr."""

from __future__ import annotations

import json
import logging
import struct
import zlib

import pytest

from v2pe_megatron.config import load_recipe
from v2pe_megatron.data.loader import build_train_loader
from v2pe_megatron.data.synthetic import draw_image, encode_image


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data): tiny on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.fixture
def data_dir(tmp_path):
    import numpy as np

    img = tmp_path / "img"
    img.mkdir()
    (img / "ok.png").write_bytes(encode_image(draw_image(np.random.default_rng(0), 64, 48, "red", "square"), "png"))
    (img / "bomb.png").write_bytes(_png_header(20000, 20000))
    (img / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A shape."}]
    lines = [{"id": "good", "image": "ok.png", "conversations": conv},
             {"id": "bomb", "image": "bomb.png", "conversations": conv},
             {"id": "junk", "image": "garbage.jpg", "conversations": conv},
             {"id": "good2", "image": "ok.png", "conversations": conv}]
    # A blank line before the bomb: line numbers are the file's, as an editor shows them.
    text = json.dumps(lines[0]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[1:]) + "\n"
    (tmp_path / "data.jsonl").write_text(text)
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": "img", "annotation": "data.jsonl"}}))
    return tmp_path


def _loader(meta, *extra):
    r = load_recipe(None, ["model.preset=tiny", "data.seq_length=512", "data.system_prompt=''",
                           "data.micro_batch_size=1",
                           "data.global_batch_size=1", "data.dali_device=cpu", f"data.meta_path={meta}", *extra])
    return build_train_loader(r, dp_rank=0, dp_size=1, max_epochs=1)


def test_decompression_bomb_header_is_a_counted_skip_named_by_file_and_line(data_dir, caplog):
    caplog.set_level(logging.WARNING, logger="v2pe_megatron.data")
    loader = _loader(data_dir / "meta.json")
    batches = list(loader)
    assert {k: v for k, v in loader.skips.items() if v} == {"oversized_image": 1, "corrupt_image": 1}
    assert loader.stats["samples"] == 2 and batches
    msgs = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    bomb = next(m for m in msgs if "oversized_image" in m)
    assert f"{data_dir / 'data.jsonl'}:3 id=bomb" in bomb
    assert "bomb.png: 20000x20000 = 400000000 pixels > data.max_image_pixels=178956970" in bomb
    junk = next(m for m in msgs if "corrupt_image" in m)
    assert f"{data_dir / 'data.jsonl'}:4 id=junk" in junk and "garbage.jpg" in junk
    for m in msgs:
        assert "BytesIO" not in m and "of epoch" not in m


def test_the_pixel_limit_is_a_data_key(data_dir):
    from v2pe_megatron.data.skips import NoUsableSamplesError

    loader = _loader(data_dir / "meta.json", "data.max_image_pixels=3072")  # ok.png: 64x48 = 3072 passes
    list(loader)
    assert loader.skips["oversized_image"] == 1 and loader.stats["samples"] == 2
    with pytest.raises(NoUsableSamplesError, match="oversized_image=3"):
        list(_loader(data_dir / "meta.json", "data.max_image_pixels=3071"))


def test_inspect_reports_the_bomb_instead_of_crashing(data_dir, capsys):
    from v2pe_megatron.cli.data import main

    rc = main(["inspect", "--meta", str(data_dir / "meta.json"), "--no-progress", "model.preset=tiny",
               "data.seq_length=512", "data.dali_device=cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert "skipped oversized_image: 1" in out.out + out.err
    assert "skipped corrupt_image: 1" in out.out + out.err


def _encode(img, fmt, **kw):
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def odd_images(tmp_path):
    """Valid images that Pillow (InternVL's reader) opens but DALI does not decode, or decodes to other
    pixels than Pillow's convert("RGB"), plus one truncated image neither can decode."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    frames = [Image.fromarray(draw_image(rng, 64, 48, c, "square")) for c in ("red", "blue", "green")]
    imgs = {
        "anim.gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "int32.tif": _encode(Image.fromarray(rng.integers(0, 2**20, (48, 64), dtype=np.int32)), "TIFF"),
        "deep.png": _encode(Image.fromarray(rng.integers(0, 65535, (48, 64), dtype=np.uint16)), "PNG"),
        "icon.ico": _encode(frames[1], "ICO"),
        "ok.png": encode_image(draw_image(rng, 64, 48, "red", "square"), "png"),
    }
    jpg = encode_image(draw_image(rng, 64, 48, "red", "square"), "jpeg")
    imgs["cut.jpg"] = jpg[: len(jpg) // 2]
    (tmp_path / "img").mkdir()
    for name, data in imgs.items():
        (tmp_path / "img" / name).write_bytes(data)
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A shape."}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"id": n, "image": n, "conversations": conv}) + "\n"
                                                 for n in imgs))
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": "img", "annotation": "data.jsonl"}}))
    return tmp_path, imgs


def test_images_dali_cannot_decode_are_tiled_by_pillow_and_counted(odd_images, caplog):
    # Before: all four were skipped as corrupt_image ("Critical error in pipeline:").
    caplog.set_level(logging.INFO, logger="v2pe_megatron.data")
    tmp, imgs = odd_images
    loader = _loader(tmp / "meta.json")
    batches = list(loader)
    assert batches and loader.stats["samples"] == 5
    assert {k: v for k, v in loader.skips.items() if v} == {"corrupt_image": 1, "decoded_by_pillow": 4}
    msgs = [r.getMessage() for r in caplog.records]
    cut = next(m for m in msgs if "corrupt_image" in m)
    # the reason and the file, not DALI's "Critical error in pipeline:" alone
    assert "cut.jpg" in cut and "DALI: " in cut and "Pillow: " in cut and "Critical error" not in cut
    why = {"anim.gif": "DALI cannot decode GIF", "icon.ico": "DALI cannot decode ICO",
           "int32.tif": "TIFF with I pixels", "deep.png": "PNG with I;16 pixels"}
    noted = [m for m in msgs if m.startswith("decoded_by_pillow")]
    assert len(noted) == 3  # the first 3, then only counted
    for m in noted:
        assert sum(f"{n}: {w}" in m for n, w in why.items()) == 1, m
    from v2pe_megatron.data.skips import SkipCounter

    lines = SkipCounter(loader.skips).report_lines()
    assert "skipped corrupt_image: 1" in lines and any(x.startswith("images decoded by Pillow") and x.endswith(": 4")
                                                       for x in lines)
    assert SkipCounter(loader.skips).total == 1  # the fallback is counted, not a skip


def test_inspect_reports_the_pillow_fallback(odd_images, capsys):
    from v2pe_megatron.cli.data import main

    tmp, _ = odd_images
    assert main(["inspect", "--meta", str(tmp / "meta.json"), "--no-progress", "model.preset=tiny",
                 "data.seq_length=512", "data.dali_device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "samples used: 5" in out and "skipped corrupt_image: 1" in out
    assert "images decoded by Pillow (DALI cannot decode them as InternVL would; kept): 4" in out


def test_training_reports_say_the_skip_counters_run_over_epochs(data_dir):
    # Before: "skipped corrupt_image=2" after two epochs of one bad image, without saying why 2.
    from v2pe_megatron.data.skips import SkipCounter, describe

    loader = _loader(data_dir / "meta.json")
    loader.max_epochs = 2
    list(loader)
    assert loader.skips["corrupt_image"] == 2 and loader.skips["oversized_image"] == 2  # once per epoch
    line = describe(loader.skips)
    assert "a bad sample counts once per epoch" in line and "corrupt_image=2" in line
    assert describe(SkipCounter().as_dict()) == ""
    kept = describe({"decoded_by_pillow": 3})
    assert kept == "decoded_by_pillow=3" and "skipped" not in kept  # kept samples are not skips
    m = SkipCounter({"corrupt_image": 2, "decoded_by_pillow": 3}).metrics()
    assert m["skipped/corrupt_image"] == 2 and m["data/decoded_by_pillow"] == 3 and "skipped/decoded_by_pillow" not in m
