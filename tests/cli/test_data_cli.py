"""``v2pe-data synth`` writes readable datasets (incl. needle-in-a-haystack with images);
``v2pe-data inspect`` reports counts and one ``skipped <reason>: <count>`` line per reason."""

from __future__ import annotations

import json
import re

from v2pe_megatron.cli.data import main
from v2pe_megatron.data.formats import load_meta

TINY = ["model.preset=tiny", "data.seq_length=2048", "data.max_dynamic_patch=4",
        "data.dali_device=cpu"]


def _counts(out: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^([a-z -]+|skipped \w+): (\d+)", out, re.M)}


def test_synth_then_inspect(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "j"), "--num-samples", "10", "--max-side", "150",
                 "--haystack-words", "80"]) == 0
    assert main(["synth", str(tmp_path / "w"), "--num-samples", "10", "--max-side", "150", "--haystack-words",
                 "80", "--format", "webdataset", "--shard-size", "4"]) == 0
    capsys.readouterr()
    recs = [json.loads(x) for x in (tmp_path / "j" / "data.jsonl").read_text().splitlines()]
    kinds = {r["id"].split("-")[-1] for r in recs}
    assert {"niah_text", "niah_image", "caption", "multi", "text"} <= kinds
    needle = next(r for r in recs if r["id"].endswith("niah_text"))
    secret = re.search(r"secret number is (\d+)", needle["conversations"][0]["value"]).group(1)
    assert needle["conversations"][1]["value"] == f"The secret number is {secret}."
    assert isinstance(needle.get("image"), (str, list))
    assert len(load_meta(tmp_path / "w" / "meta.json")[0]) == 10

    outs = []
    for d in ("j", "w"):
        assert main(["inspect", "--meta", str(tmp_path / d / "meta.json"), "--no-progress", "--show", "2",
                     *TINY]) == 0
        outs.append(capsys.readouterr().out)
    c = _counts(outs[0])
    assert c["samples read"] == c["samples used"] == 10 and c["tiles"] >= 10 and c["packs"] >= 1
    assert c["tokens"] > 10 * 20
    assert "skipped: none" in outs[0] and outs[0].count("sample ") >= 2
    assert _counts(outs[1]) == c  # same data through webdataset shards


def test_inspect_reports_skips_and_all_bad(tmp_path, capsys):
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]
    lines = [json.dumps({"id": 1, "image": "gone.png", "conversations": conv}), "{oops",
             json.dumps({"id": 3, "conversations": [{"from": "human", "value": "hi"},
                                                    {"from": "gpt", "value": "hello"}]})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"annotation": "d.jsonl"}}))
    assert main(["inspect", "--meta", str(tmp_path / "meta.json"), "--no-progress", *TINY]) == 0
    out = capsys.readouterr().out
    assert "skipped missing_image: 1" in out and "skipped bad_json: 1" in out
    assert _counts(out)["samples used"] == 1

    (tmp_path / "d.jsonl").write_text("\n".join(lines[:2]) + "\n")
    assert main(["inspect", "--meta", str(tmp_path / "meta.json"), "--no-progress", *TINY]) == 2
    assert "no usable sample" in capsys.readouterr().err


def test_inspect_lists_every_skip_in_a_skips_file(tmp_path, capsys):
    # Before: only the log's first 3 per reason named a sample; the rest were counts.
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]
    ok = {"id": "ok", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    lines = [json.dumps(ok)] + [json.dumps({"id": f"m{i}", "image": f"gone{i}.png", "conversations": conv})
                                for i in range(5)] + ["{oops"]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"annotation": "d.jsonl"}}))
    out_file = tmp_path / "skips.jsonl"
    args = ["inspect", "--meta", str(tmp_path / "meta.json"), "--no-progress", "--skips-file", str(out_file), *TINY]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "skipped missing_image: 5" in out and "skipped bad_json: 1" in out
    assert "skips in this epoch" in out and "once per epoch" in out
    recs = sorted((json.loads(x) for x in out_file.read_text().splitlines()), key=lambda r: r["line"])
    ann = str(tmp_path / "d.jsonl")
    assert [(r["file"], r["line"], r["reason"]) for r in recs] == \
        [(ann, n, "missing_image") for n in range(2, 7)] + [(ann, 7, "bad_json")]
    assert [r["id"] for r in recs[:5]] == [f"m{i}" for i in range(5)] and recs[5]["id"] is None
    assert all(f"gone{i}.png" in r["message"] for i, r in enumerate(recs[:5]))
    # An existing file is never overwritten (it may be the user's annotation file).
    before = out_file.read_bytes()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--skips-file" in err and "exists" in err and "Traceback" not in err
    assert out_file.read_bytes() == before
    assert main([*args[:5], str(tmp_path / "no/such/dir/s.jsonl"), *TINY]) == 2
    assert "cannot create it" in capsys.readouterr().err


def test_synth_needles_train_split_is_read_by_the_loader(tmp_path, capsys):
    """--split train writes InternVL-format samples the training loader reads whole (the lengths
    fit the tiny recipe's 256-token packs), and refuses to write over an existing data set."""
    out = tmp_path / "train"
    args = ["synth", str(out), "--needles", "--split", "train", "--lengths", "120", "--depths", "0", "1",
            "--tasks", "retrieval-text", "retrieval-image", "--image-tokens", "4", "--image-fraction", "0.6"]
    assert main(args) == 0
    recs = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(r["conversations"][1]["from"] == "gpt" for r in recs)
    capsys.readouterr()
    assert main(["inspect", "--meta", str(out / "meta.json"), "--no-progress", *TINY,
                 "data.max_dynamic_patch=1"]) == 0
    c = _counts(capsys.readouterr().out)
    assert c["samples read"] == c["samples used"] == 4
    before = (out / "data.jsonl").read_bytes()
    assert main(args) == 2
    assert "meta.json exists" in capsys.readouterr().err and (out / "data.jsonl").read_bytes() == before
