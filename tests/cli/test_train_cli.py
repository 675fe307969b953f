"""``v2pe-train`` end to end: 2 self-started gloo ranks, tiny InternVL on synthetic data, MLflow in an
embedded store, a checkpoint, and a resume that continues the same losses and the same MLflow run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _train(tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "v2pe_megatron.cli.train", str(ROOT / "recipes/tiny_cpu.yaml"),
           "tracking.system_metrics=false", f"checkpoint.dir={tmp / 'ckpt'}", "data.seq_length=128", *overrides]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


def _losses(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"step \d+/\d+  loss ([0-9.]+)", out)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    r = _train(tmp, "train.steps=4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, r


@pytest.mark.slow
def test_demo_run_trains_and_tracks(uninterrupted):
    tmp, r = uninterrupted
    out = r.stdout + r.stderr
    assert "starting 2 ranks" in out
    losses = _losses(out)
    assert len(losses) == 4 and all(0 < x < 20 for x in losses)
    assert (tmp / "ckpt" / "latest").read_text().strip() == "4"
    assert "ran steps 1..4 on 2 rank(s)" in r.stdout
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'runs/tiny_cpu/mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["v2pe-megatron"], output_format="list")
    assert len(runs) == 1
    hist = mlflow.tracking.MlflowClient().get_metric_history(runs[0].info.run_id, "loss")
    assert [h.step for h in hist] == [1, 2, 3, 4]
    assert [h.value for h in hist] == pytest.approx(losses, abs=1e-5)
    assert runs[0].data.params["parallel.tp"] == "1"


@pytest.mark.slow
def test_resume_continues_losses_and_run(uninterrupted, tmp_path):
    _, full = uninterrupted
    first = _train(tmp_path, "train.steps=4", "train.exit_after_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _train(tmp_path, "train.steps=4")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed" in second.stdout + second.stderr
    ref = _losses(full.stdout + full.stderr)
    got = _losses(first.stdout + first.stderr) + _losses(second.stdout + second.stderr)
    assert got == pytest.approx(ref, abs=1e-5)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs/tiny_cpu/mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["v2pe-megatron"], output_format="list")
    assert len(runs) == 1  # the resumed job logged into the same run


@pytest.mark.slow
def test_bad_layout_fails_before_launch(tmp_path):
    r = _train(tmp_path, "parallel.tp=3")
    assert r.returncode == 2
    assert "parallel.tp=3 must divide" in r.stderr
    assert "starting" not in r.stdout


def _lrs(out: str) -> dict[int, float]:
    return {int(s): float(lr) for s, lr in re.findall(r"step (\d+)/\d+  loss [0-9.]+  lr ([0-9.e+-]+)", out)}


@pytest.mark.slow
def test_extending_a_finished_run_follows_the_recipes_schedule(tmp_path):
    # A finished 4-step run ends at lr 0 (cosine to min_lr 0); raising train.steps must not train the
    # new steps at that final lr: the schedule is the recipe's, over 8 steps, and the change is said.
    first = _train(tmp_path, "train.steps=4", "tracking.backend=none")
    assert first.returncode == 0, first.stderr[-3000:]
    assert _lrs(first.stdout + first.stderr)[4] == 0.0
    more = _train(tmp_path, "train.steps=8", "tracking.backend=none")
    out = more.stdout + more.stderr
    assert more.returncode == 0, out[-3000:]
    lrs = _lrs(out)
    assert sorted(lrs) == [5, 6, 7, 8] and lrs[5] > 0 and lrs[8] == 0.0
    assert "schedule follows the recipe" in out and "lr_decay_steps 4 -> 8 (train.steps)" in out
