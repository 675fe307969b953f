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
    r = load_recipe(None, ["model.preset=tiny", "data.seq_length=512", "data.micro_batch_size=1",
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
