"""The exit code of a stop signal says whether anything new was saved (``runtime.exit_codes``), in
process: one rank, the tiny recipe, the signal sent by the process to itself at a chosen moment.

- With ``checkpoint.dir``: stop after the step in flight, save it, ``RESUME`` (75).
- Without ``checkpoint.dir``: nothing saved, ``stopped(N)`` = 128 + N and a message saying the
  trained steps are lost (75 would make a requeueing job start over forever).
- A signal during set-up (before the first step): no step trained, nothing saved, ``stopped(N)``,
  even with a ``checkpoint.dir`` (a requeue would start where this run started).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from v2pe_megatron.cli.train import main
from v2pe_megatron.runtime import exit_codes

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny_cpu.yaml")
ONE_RANK = ["launcher.nproc_per_node=1", "tracking.backend=none", "data.seq_length=128", "train.steps=5",
            "data.global_batch_size=1", "data.micro_batch_size=1"]


@pytest.fixture
def signal_at(monkeypatch, tmp_path):
    """``signal_at("step", sig)``: the process signals itself during the first step's forward;
    ``signal_at("setup", sig)``: while the data loader is built (before the first step)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MASTER_PORT", raising=False)

    def arm(when: str, sig: int) -> None:
        if when == "step":
            from v2pe_megatron.training import loop

            forward = loop.vlm_forward_step

            def signalled(data_iterator, model):
                os.kill(os.getpid(), sig)
                return forward(data_iterator, model)

            monkeypatch.setattr(loop, "vlm_forward_step", signalled)
        else:
            from v2pe_megatron.data import loader

            build = loader.build_train_loader

            def signalled(*a, **k):
                os.kill(os.getpid(), sig)
                return build(*a, **k)

            monkeypatch.setattr(loader, "build_train_loader", signalled)
    return arm


def test_stop_with_a_checkpoint_dir_saves_and_asks_to_resume(signal_at, tmp_path, capsys):
    signal_at("step", signal.SIGTERM)
    assert main([TINY, *ONE_RANK, "checkpoint.dir=ckpt"]) == exit_codes.RESUME
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "1"
    assert "run the same command to resume" in capsys.readouterr().out


def test_stop_without_a_checkpoint_dir_says_nothing_was_saved_and_is_no_resume_code(signal_at, tmp_path, capsys):
    signal_at("step", signal.SIGTERM)
    code = main([TINY, *ONE_RANK])
    assert code == exit_codes.stopped(signal.SIGTERM) == 143
    out = capsys.readouterr().out
    assert ("exit code 143: stopped by SIGTERM; checkpoint.dir is not set, so the 1 step(s) trained are not "
            "saved; running again starts over at step 1") in out
    assert "resume" not in out.lower()
    assert not list(tmp_path.rglob("latest"))


def test_signal_before_the_first_step_trains_nothing_and_is_no_resume_code(signal_at, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # the hint about Slurm's time-limit signal
    signal_at("setup", signal.SIGUSR1)
    code = main([TINY, *ONE_RANK, "checkpoint.dir=ckpt"])
    assert code == exit_codes.stopped(signal.SIGUSR1) == 138
    out = capsys.readouterr().out
    assert "stopped by SIGUSR1; it came before the first step, so nothing new was saved" in out
    assert "the job's --time is not longer than N" in out
    assert "step 1/5" not in out
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_stopped_codes_are_128_plus_the_signal_and_only_for_stop_signals():
    assert [exit_codes.stopped(s) for s in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)] == [130, 138, 143]
    assert exit_codes.stopped_by(143) == signal.SIGTERM and exit_codes.stopped_by(137) is None
    assert exit_codes.stopped_by(exit_codes.RESUME) is None
