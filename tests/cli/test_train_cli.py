"""``v2pe-train`` end to end: 2 self-started gloo ranks, tiny InternVL on synthetic data, MLflow in an
embedded store, a checkpoint, and a resume that continues the same losses and the same MLflow run."""

from __future__ import annotations

import os
import re
import shutil
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
    # the length it trained at, for v2pe-eval --ckpt's trained range (docs/eval.md)
    from v2pe_megatron.training.checkpoint_files import recorded_seq_length

    assert recorded_seq_length(tmp / "ckpt") == (128, tmp / "ckpt" / "iter_0000004" / "model.yaml")
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
def test_extending_a_finished_run_follows_the_recipes_schedule(uninterrupted, tmp_path):
    # A finished 4-step run ends at lr 0 (cosine to min_lr 0); raising train.steps must not train the
    # new steps at that final lr: the schedule is the recipe's, over 8 steps, and the change is said.
    full, first = uninterrupted  # the finished 4-step run, continued here from a copy of its checkpoints
    assert _lrs(first.stdout + first.stderr)[4] == 0.0
    shutil.copytree(full / "ckpt", tmp_path / "ckpt")
    more = _train(tmp_path, "train.steps=8", "tracking.backend=none")
    out = more.stdout + more.stderr
    assert more.returncode == 0, out[-3000:]
    lrs = _lrs(out)
    assert sorted(lrs) == [5, 6, 7, 8] and lrs[5] > 0 and lrs[8] == 0.0
    assert "schedule follows the recipe" in out and "lr_decay_steps 4 -> 8 (train.steps)" in out


# ---------------------------------------------------------------------------------------------
# Before anything is built: in-process ``main([...])``; ``_run`` (the rank's training) and the launcher
# fail the test if reached.
# ---------------------------------------------------------------------------------------------
TINY = str(ROOT / "recipes/tiny_cpu.yaml")


@pytest.fixture
def nothing_runs(monkeypatch):
    from v2pe_megatron.cli import train as cli

    def built(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(cli, "_run", built)
    monkeypatch.delenv("V2PE_PREFLIGHT_DONE", raising=False)
    return cli


def _bad_recipe(tmp: Path, kind: str) -> str:
    p = tmp / f"{kind}.yaml"
    p.write_text({"empty": "", "comments": "# nothing yet\n", "list": "- model\n- data\n"}[kind])
    return str(p)


@pytest.mark.parametrize("case", ["file", "below_a_file", "proc", "nccl", "te", "token_ids", "vocab", "empty",
                                  "comments", "list"])
def test_bad_input_exits_2_with_one_line_before_launch(case, tmp_path, capsys, nothing_runs):
    (tmp_path / "f").write_text("keep me")
    recipe, extra, expect = TINY, [], ""
    if case in ("empty", "comments", "list"):
        recipe = _bad_recipe(tmp_path, case)
        expect = "is empty" if case != "list" else "not a list"
    else:
        extra, expect = {"file": (f"checkpoint.dir={tmp_path / 'f'}", "f is a file"),
                         "below_a_file": (f"checkpoint.dir={tmp_path / 'f' / 'ck'}", "f is a file"),
                         "proc": ("checkpoint.dir=/proc/nope", "checkpoint.dir=/proc/nope: cannot create files"),
                         "nccl": ("launcher.backend=nccl", "launcher.backend=nccl needs CUDA"),
                         "te": ("model.spec=te", "model.spec=te needs CUDA and transformer-engine"),
                         "token_ids": ("model.img_context_token_id=9", "model.img_context_token_id=9 but"),
                         "vocab": ("model.language.vocab_size=100", "model.language.vocab_size=100")}[case]
        extra = [extra]
    if case in ("nccl", "te"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    assert nothing_runs.main([recipe, "tracking.backend=none", *extra]) == 2
    out, err = capsys.readouterr()
    assert expect in err, err
    assert err.count("\n") == 1 and err.startswith("v2pe-train: ") and "Traceback" not in err, err
    assert "starting" not in out
    assert (tmp_path / "f").read_text() == "keep me"


@pytest.mark.parametrize("name", ["internvl2_2b_32k", "internvl2_2b_1m"])
def test_2b_recipe_without_its_placeholders_exits_2_in_every_rank(name, monkeypatch, capsys, nothing_runs):
    for var in ("V2PE_META_PATH", "V2PE_TOKENIZER", "V2PE_PRETRAINED", "V2PE_CKPT_DIR"):
        monkeypatch.delenv(var, raising=False)
    for rank in ("0", "5"):  # as srun starts them: each rank decides alone, before any rendezvous
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "64")
        assert nothing_runs.main([str(ROOT / "recipes" / f"{name}.yaml")]) == 2
        err = capsys.readouterr().err
        assert "V2PE_TOKENIZER is not set" in err and err.count("\n") == 1


def test_ranks_started_by_the_cli_skip_the_checks_it_made(tmp_path, monkeypatch, nothing_runs):
    import v2pe_megatron.runtime.launch as launch

    seen = {}

    def run_local(cmd, nproc, env=None):
        seen["env"] = env
        return 0

    monkeypatch.setattr(launch, "run_local", run_local)
    assert nothing_runs.main([TINY, "tracking.backend=none", f"checkpoint.dir={tmp_path / 'ck'}"]) == 0
    assert seen["env"]["V2PE_PREFLIGHT_DONE"] == "1"
    # in such a rank a failing check is not made again (the parent made it, with this environment)
    monkeypatch.setenv("V2PE_PREFLIGHT_DONE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(nothing_runs, "_run", lambda recipe: 0)
    assert nothing_runs.main([TINY, "tracking.backend=none", "model.img_context_token_id=9"]) == 0


def test_a_finished_run_exits_0_without_building(tmp_path, monkeypatch, capsys, nothing_runs):
    from v2pe_megatron.testing.fakes import checkpoint_folder as fake_checkpoint

    monkeypatch.chdir(tmp_path)
    fake_checkpoint(tmp_path / "ck", 4)
    assert nothing_runs.main([TINY, "tracking.backend=none", "checkpoint.dir=ck", "train.steps=4"]) == 0
    out = capsys.readouterr().out
    assert "tiny_cpu is complete: its checkpoint" in out and "iter_0000004 is at step 4 (train.steps=4)" in out
    assert "starting" not in out and "ran steps" not in out


@pytest.mark.slow
def test_rerunning_a_finished_run_says_so(uninterrupted, monkeypatch, capsys, nothing_runs):
    # the demo run's real checkpoint and MLflow run; in-process, nothing is built
    tmp, r = uninterrupted
    run_id = re.search(r"MLflow run (\w+) in", r.stdout).group(1)
    monkeypatch.chdir(tmp)
    assert nothing_runs.main([TINY, "tracking.system_metrics=false", f"checkpoint.dir={tmp / 'ckpt'}",
                              "data.seq_length=128", "train.steps=4"]) == 0
    out = capsys.readouterr().out
    assert "is complete" in out and f"MLflow run {run_id} in sqlite:///" in out


def test_usage_shows_the_overrides_are_optional(capsys):
    from v2pe_megatron.cli.train import main

    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "v2pe-train RECIPE [key=value ...]" in err and "v2pe-train --list" in err
    assert "required" not in err and "give a recipe file" in err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "dotted overrides (optional)" in capsys.readouterr().out


def test_list_shows_the_shipped_recipes_and_presets(capsys):
    from v2pe_megatron.cli.train import main
    from v2pe_megatron.config import PRESETS

    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for f in sorted((ROOT / "recipes").glob("*.yaml")):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f.name))
        first_comment = next(ln for ln in f.read_text().splitlines() if ln.startswith("#")).lstrip("# ").strip()
        assert first_comment in line
    assert re.search(r"tiny_cpu.yaml +tiny, 2 rank\(s\), 256 tokens", out)
    assert re.search(r"internvl2_2b_32k.yaml +internvl2-2b, 32 rank\(s\), 32768 tokens", out)
    for name in PRESETS:
        assert re.search(rf"^  {re.escape(name)} ", out, re.M)
    assert "2.21B parameters" in out and "0.34M parameters" in out
