"""``v2pe-train``'s Slurm options: ``--print-sbatch`` (the sbatch line for a recipe, or a refusal
with the fix), ``--run-name`` (the run folder a requeued job finds again), and a stop signal that
arrives while a rank is still starting (``exit_codes.stopped(N)``, not death by the signal, and not 75:
nothing new was saved)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from v2pe_megatron.cli.train import main
from v2pe_megatron.runtime import exit_codes

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny_cpu.yaml")


def test_print_sbatch_prints_the_command_for_the_layout(capsys):
    assert main([TINY, "--print-sbatch", "--nodes", "2", "--gpus-per-node", "8", "--time", "12:00:00",
                 "parallel.tp=2", "parallel.cp=4", "data.seq_length=256", "data.global_batch_size=4"]) == 0
    comment, line = capsys.readouterr().out.strip().splitlines()
    assert comment.startswith("# tp=2 pp=1 cp=4 dp=2 on 2 node(s) x 8 GPUs = 16 ranks")
    assert line.startswith("sbatch --job-name=tiny_cpu --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 "
                           "--time=12:00:00 --signal=USR1@300 ")
    assert line.endswith(f"train.sbatch {TINY} parallel.tp=2 parallel.cp=4 data.seq_length=256 "
                         "data.global_batch_size=4")


def test_print_sbatch_refuses_an_allocation_the_layout_cannot_use(capsys):
    assert main([TINY, "--print-sbatch", "--nodes", "1", "--gpus-per-node", "3", "parallel.tp=2"]) == exit_codes.USAGE
    err = capsys.readouterr().err
    assert "does not fit 1 node(s) x 3 GPUs = 3 ranks" in err and "not divisible by tp*pp*cp" in err


def test_allocation_options_need_print_sbatch(capsys):
    assert main([TINY, "--nodes", "2"]) == exit_codes.USAGE
    assert "go with --print-sbatch" in capsys.readouterr().err


def test_run_name_gives_the_run_its_folder(capsys):
    assert main([TINY, "--run-name", "job7", "--print-recipe"]) == 0
    out = capsys.readouterr().out
    assert "name: job7" in out and "dir: runs/job7/checkpoints" in out
    assert main([TINY, "--run-name", "job7", "checkpoint.dir=elsewhere", "--print-recipe"]) == 0
    assert "dir: elsewhere" in capsys.readouterr().out  # an explicit checkpoint.dir wins


def _catches(pid: int, sig: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads signal masks from /proc")
def test_stop_signal_during_start_up_exits_stopped_not_resume(tmp_path):
    # One rank as under srun (SLURM_PROCID set): USR1 as soon as the process handles it, long before
    # torch and megatron are imported and the training loop installs its own handlers.
    env = dict(os.environ, SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_JOB_ID="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "v2pe_megatron.cli.train", TINY, "tracking.backend=none"],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    end = time.monotonic() + 60
    while not _catches(p.pid, signal.SIGUSR1):
        assert p.poll() is None and time.monotonic() < end, p.communicate()[0]
        time.sleep(0.01)
    p.send_signal(signal.SIGUSR1)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == exit_codes.stopped(signal.SIGUSR1) == 138, out
    assert "got SIGUSR1 before training started: nothing trained, nothing new to save; exit code 138" in out
    assert "USR1 is the time-limit signal" in out  # under Slurm (SLURM_JOB_ID set)
    assert "step 1/" not in out
