"""``v2pe-data synth --needles`` then ``v2pe-eval`` end to end on the tiny model: the console table,
heat map, results.json and the MLflow run (metrics + artifacts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from v2pe_megatron.cli.data import main as data_main
from v2pe_megatron.cli.eval import main as eval_main
from v2pe_megatron.cli.eval import parse_delta

ROOT = Path(__file__).resolve().parents[2]


def test_parse_delta_and_usage_errors(capsys):
    assert parse_delta("1/16") == 0.0625 and parse_delta("0.5") == 0.5 and parse_delta("auto") == "auto"
    with pytest.raises(SystemExit):
        eval_main([str(ROOT / "recipes/tiny_cpu.yaml"), "--delta", "2"])
    assert "must be in (0, 1]" in capsys.readouterr().err
    assert eval_main([str(ROOT / "recipes/tiny_cpu.yaml"), "parallel.nope=1"]) == 2


def test_choose_delta_prints_the_rule_per_length(capsys):
    assert eval_main([str(ROOT / "recipes/tiny_cpu.yaml"), "--choose-delta", "--lengths", "64", "512",
                      "--trained-positions", "400", "--tasks", "retrieval-text"]) == 0
    out = capsys.readouterr().out
    assert "whose positions stay below the trained range 400" in out
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0] in ("64", "512")]
    assert [r[0] for r in rows] == ["64", "512"] and rows[0][2] == "1"  # a short context keeps delta 1


def test_synth_needles_cli(tmp_path, capsys):
    assert data_main(["synth", str(tmp_path), "--needles", "--lengths", "100", "--depths", "0", "1",
                      "--tasks", "retrieval-text", "reasoning-image", "--image-tokens", "4"]) == 0
    assert "wrote 4 needle samples" in capsys.readouterr().out
    # MM-NIAH's layout: one annotation file per task, image paths relative to images/
    assert sorted(p.name for p in (tmp_path / "annotations").iterdir()) == ["reasoning-image.jsonl",
                                                                          "retrieval-text.jsonl"]
    lines = [json.loads(x) for p in sorted((tmp_path / "annotations").iterdir()) for x in p.read_text().splitlines()]
    assert {tuple(sorted(x)) for x in lines} == {("answer", "context", "id", "images_list", "meta", "question")}
    assert all((tmp_path / "images" / p).is_file() for x in lines for p in x["images_list"])
    # written again into the same folder: refused, nothing overwritten
    assert data_main(["synth", str(tmp_path), "--needles", "--lengths", "100", "--depths", "0",
                      "--tasks", "retrieval-text", "--image-tokens", "4"]) == 2
    assert "exist(s): give an empty output folder" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_cli_end_to_end(tmp_path):
    assert data_main(["synth", str(tmp_path / "d"), "--needles", "--lengths", "96", "160", "--depths", "0", "1",
                      "--tasks", "retrieval-text", "retrieval-image", "--image-tokens", "4"]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "v2pe_megatron.cli.eval", str(ROOT / "recipes/tiny_cpu.yaml"),
           "--data", str(tmp_path / "d"), "--lengths", "96", "160", "--depths", "0", "1",
           "--delta", "1", "1/16", "auto", "--trained-positions", "150", "--max-new-tokens", "3",
           "--out", str(tmp_path / "out"), "model.spec=local"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "v2pe-eval: tiny_cpu: 8 samples x 3 delta(s), modes generate, teacher-forced" in out
    assert "v2pe-eval: weights: random (no --ckpt)" in out
    for title in ("generation score, delta 1, token grid ", "teacher-forced accuracy, delta 1/16, token grid ",
                  "teacher-forced mean log-prob per answer token, delta auto, token grid "):
        assert title in out
    rule = [line for line in out.splitlines() if line.startswith("delta rule (trained positions 150): ")]
    assert [line.split(": ")[1].split("-token")[0] for line in rule] == ["96", "160"]
    assert all("v2pe-convert export-hf --v2pe-delta " in line for line in rule)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(res["records"]) == 8 * 3 and res["lengths"] == [96, 160] and res["deltas"] == ["1", "1/16", "auto"]
    assert (tmp_path / "out" / "heatmap.png").stat().st_size > 10_000

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/runs/tiny_cpu/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    run_id = out.split("MLflow run ")[1].split()[0]
    run = client.get_run(run_id)
    assert run.info.run_name == "eval-tiny_cpu" and run.data.tags["kind"] == "eval"
    m = run.data.metrics
    assert m["eval/tf_logp/delta_1_16/grid/mean"] == pytest.approx(
        next(g["mean"] for g in res["grids"] if g["metric"] == "tf_logp" and g["delta"] == "1/16"))
    assert "eval/generate/delta_auto/grid/len_160/depth_1" in m
    assert m["eval/generate/delta_1/v2pe/overall"] == pytest.approx(
        next(a["v2pe"]["overall"] for a in res["aggregations"] if a["metric"] == "generate" and a["delta"] == "1"))
    assert {a.path for a in client.list_artifacts(run_id)} >= {"heatmap.png", "heatmap_mmniah.png", "results.json"}
    # both aggregations named on the console; these ~100-token contexts are under MM-NIAH's first bin
    assert "V2PE sample-weighted mean, generation score, delta 1/16 (V2PE's weighted_avg_acc" in out
    assert "left out: 8 sample(s) under 1k tokens (meta.context_length)" in out
    # MM-NIAH's result files, one per delta and task, for its calculate_scores.py
    files = sorted(p.name for p in (tmp_path / "out" / "mmniah_outputs").iterdir())
    assert files == sorted(f"tiny_cpu-random-delta{d}_{t}-val.jsonl" for d in ("1", "1-16", "auto")
                           for t in ("retrieval-text", "retrieval-image"))


def test_the_delta_eval_prints_is_what_export_hf_takes():
    # v2pe-eval prints "v2pe-convert export-hf --v2pe-delta 1/256": both tools read the same spellings.
    from v2pe_megatron.cli.convert import _parser as convert_parser

    args = convert_parser().parse_args(["export-hf", "--ckpt", "c", "--out", "o", "--layout", "transformers",
                                        "--v2pe-delta", "1/256"])
    assert args.v2pe_delta == parse_delta("1/256") == 1 / 256
    with pytest.raises(SystemExit):
        convert_parser().parse_args(["export-hf", "--ckpt", "c", "--out", "o", "--layout", "transformers",
                                     "--v2pe-delta", "2"])


@pytest.fixture
def nothing_runs(monkeypatch):
    """v2pe-eval must answer before any rank starts or model is built."""
    import v2pe_megatron.eval.runner as runner
    import v2pe_megatron.runtime.launch as launch

    def started(*a, **k):
        raise AssertionError("the evaluation started")

    monkeypatch.setattr(runner, "evaluate", started)
    monkeypatch.setattr(launch, "run_local", started)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)


@pytest.mark.parametrize("flags, says", [
    (["--limit", "-1"], "--limit -1 must be >= 0"),
    (["--nproc", "0"], "--nproc 0 must be >= 1"),
    (["--max-tiles-per-image", "0"], "--max-tiles-per-image 0 must be >= 1"),
    (["--samples-per-cell", "0"], "--samples-per-cell 0 must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
    (["--trained-positions", "0"], "--trained-positions 0 must be >= 1"),
    (["--depths", "0", "1.5"], "--depths [0.0, 1.5] must lie in [0, 1]"),
    (["--data", "no/such.jsonl"], "--data no/such.jsonl: no such file"),
    (["--out", "/proc/nope"], "--out /proc/nope: cannot create files in /proc"),
])
def test_bad_flags_exit_2_before_anything_runs(flags, says, nothing_runs, tmp_path, capsys):
    assert eval_main([str(ROOT / "recipes/tiny_cpu.yaml"), "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"v2pe-eval: {says}"), err


def test_unwritable_out_is_found_at_start(nothing_runs, tmp_path, capsys):
    """The folder the results go to is checked before the evaluation, not written after it; the
    check leaves nothing behind."""
    afile = tmp_path / "a_file"
    afile.write_text("mine")
    for out, says in ((afile, f"{afile} is a file, not a folder"), (afile / "sub", f"{afile} is a file, not a folder")):
        assert eval_main([str(ROOT / "recipes/tiny_cpu.yaml"), "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip() == f"v2pe-eval: --out {out}: {says}; give a writable folder with --out"
    assert afile.read_text() == "mine"
    # a writable, missing folder passes the check (the evaluation then starts) and is not made yet
    with pytest.raises(AssertionError, match="the evaluation started"):
        eval_main([str(ROOT / "recipes/tiny_cpu.yaml"), "--out", str(tmp_path / "new" / "eval")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_prints_the_iteration_it_loaded(monkeypatch, tmp_path, capsys):
    import v2pe_megatron.eval.runner as runner
    import v2pe_megatron.training.checkpointing as ckpt_mod
    from v2pe_megatron.eval.report import EvalReport

    def evaluate(recipe, settings, source, ckpt=None):
        return EvalReport([], [], [], ["1"], list(settings.modes), checkpoint=Path(ckpt) / "iter_0000030")

    monkeypatch.setattr(runner, "evaluate", evaluate)
    # no checkpoint on disk: the model check before launch (tests/training/test_checkpoint_model_match.py) passes
    monkeypatch.setattr(ckpt_mod, "check_model_matches", lambda *a, **k: None)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert eval_main([str(ROOT / "recipes/tiny_cpu.yaml"), "--ckpt", str(tmp_path / "run"), "--out",
                      str(tmp_path / "o")]) == 0
    assert f"v2pe-eval: weights: iteration 30 ({tmp_path / 'run' / 'iter_0000030'})" in capsys.readouterr().out
    assert runner.checkpoint_label(Path("w/weights")) == "weights w/weights"


def test_unwritable_dir(tmp_path):
    from v2pe_megatron.runtime.paths import unwritable_dir

    assert unwritable_dir(tmp_path) is None and unwritable_dir(tmp_path / "no" / "such" / "folder") is None
    assert list(tmp_path.iterdir()) == []  # the probe is gone, nothing was made
    (tmp_path / "f").write_text("")
    assert unwritable_dir(tmp_path / "f" / "x") == f"{tmp_path / 'f'} is a file, not a folder"
    assert unwritable_dir("/proc/nope").startswith("cannot create files in /proc (")
