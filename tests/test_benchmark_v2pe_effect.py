"""benchmarks/v2pe_effect.py (the V2PE effect experiment, docs/v2pe.md): its flags, and a miniature of
the whole pipeline (the real v2pe-train and v2pe-eval, a few steps, two lengths) so the command
cannot rot."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
effect = importlib.import_module("v2pe_effect")


@pytest.mark.parametrize("flags, message", [
    (["--set", "v2pe.policy=random"], "outside v2pe and name"),
    (["--steps", "0"], "--steps 0 must be >= 1"),
    (["--lengths-factor", "0", "2"], "every factor must be >= 1"),
    (["--deltas", "1", "2"], "--deltas 2"),
    (["--depths", "1.5"], "every depth must lie in [0, 1]"),
    (["--set", "data.seq_length=abc"], "data.seq_length"),
])
def test_bad_flags_exit_2_before_anything_runs(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert effect.main(["--seed", "0", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_an_existing_output_is_never_overwritten(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")
    assert effect.main(["--seed", "0", "--out", str(tmp_path)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == "{}"


@pytest.mark.slow
def test_miniature_experiment_runs_end_to_end(tmp_path):
    out = tmp_path / "effect"
    assert effect.main(["--seed", "1", "--out", str(out), "--steps", "2", "--lengths-factor", "1", "2",
                        "--depths", "0", "1", "--samples-per-cell", "1", "--train-samples", "10",
                        "--set", "data.seq_length=256"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert (out / "effect.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    L = res["L"]
    assert 0 < L < 256 and res["eval_lengths"] == [L, 2 * L] and res["steps"] == 2
    assert res["training_data"]["longest_sample_tokens"] <= 256
    assert set(res["models"]) == {"baseline", "v2pe"}
    assert {m["v2pe_policy"] for m in res["models"].values()} == {"default", "random"}
    for name, m in res["models"].items():
        assert (Path(m["ckpt"]) / "latest").exists(), name  # v2pe-train saved, v2pe-eval loaded it
        assert set(m["eval"]) == {str(L), str(2 * L)}
        for length, by_delta in m["eval"].items():
            assert list(by_delta) == ["1", "1/4", "1/16", "1/64", "auto"]
            for cell in by_delta.values():
                assert cell["samples"] == 4 and 0.0 <= cell["accuracy"] <= 1.0
                assert math.isfinite(cell["mean_logprob"]) and cell["mean_logprob"] < 0
                assert set(cell["per_task"]) == {"retrieval-text", "retrieval-image"}
        # 2L's prompts pass the trained 256 positions at delta 1: the delta rule picks a smaller one
        assert min(m["eval"][str(2 * L)]["auto"]["delta_values"]) < 1.0
    # two trainings that differ in the delta policy end in different weights
    b, v = (res["models"][k]["eval"][str(L)]["1"]["mean_logprob"] for k in ("baseline", "v2pe"))
    assert b != v
    # the training data is the train split: none of its answers' needles is an eval needle
    recs = [json.loads(x) for x in (Path(res["training_data"]["meta"]).parent / "data.jsonl").read_text().splitlines()]
    assert recs and all("diamond" in r["conversations"][0]["value"] or "hidden object" in r["conversations"][0]["value"]
                        for r in recs)
