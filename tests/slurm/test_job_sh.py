"""``slurm/job.sh`` without a cluster: which Python the jobs use, and the environment defaults that
a user can override. ``srun`` and ``scontrol`` are stubs on PATH that print what they were given."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # starts bash subprocesses

SRUN = """#!/bin/sh
echo "srun $*"
echo "env MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT OMP_NUM_THREADS=$OMP_NUM_THREADS \
CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"
exit ${STUB_RC:-0}
"""
SCONTROL = """#!/bin/sh
if [ "$1 $2" = "show hostnames" ]; then echo node07; echo node08; else echo "scontrol $*"; fi
"""
SQUEUE = """#!/bin/sh
echo "${STUB_LIMIT:-4:00:00}"
"""


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("squeue", SQUEUE)):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in
            ("V2PE_PYTHON", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "SBATCH_SIGNAL")}
    base.update(PATH=f"{bin_}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NAME="j",
                SLURM_JOB_NODELIST="node[07-08]", SLURM_SUBMIT_DIR=str(tmp_path))
    base.update(env)
    script = f'source "{ROOT}/slurm/job.sh"; v2pe_srun some.module --flag "two words"'
    return subprocess.run(["bash", "-c", script], cwd=tmp_path, env=base, capture_output=True, text=True, timeout=60)


def test_python_from_v2pe_python_then_the_submit_dirs_venv_then_path(tmp_path):
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text("#!/bin/sh\n")
    (venv / "python").chmod(0o755)
    r = _run(tmp_path)
    assert f"srun --kill-on-bad-exit=0 --wait=60 {venv / 'python'} -m some.module --flag two words" in r.stdout, r
    r = _run(tmp_path, V2PE_PYTHON="/bin/true")
    assert "srun --kill-on-bad-exit=0 --wait=60 /bin/true -m some.module" in r.stdout
    (venv / "python").unlink()
    assert "-m some.module" in _run(tmp_path).stdout and "python3" in _run(tmp_path).stdout
    r = _run(tmp_path, V2PE_PYTHON=str(tmp_path / "missing"))
    assert r.returncode == 2 and "is not an executable" in r.stderr


def test_rendezvous_and_settings_default_from_the_allocation_and_can_be_overridden(tmp_path):
    r = _run(tmp_path, V2PE_PYTHON="/bin/true")
    assert ("env MASTER_ADDR=node07 MASTER_PORT=24242 OMP_NUM_THREADS=1 CUDA_DEVICE_MAX_CONNECTIONS=1 "
            "NCCL_NVLS_ENABLE=0") in r.stdout
    r = _run(tmp_path, V2PE_PYTHON="/bin/true", MASTER_ADDR="head", MASTER_PORT="1234", SLURM_CPUS_PER_TASK="8",
             NCCL_NVLS_ENABLE="1")
    assert "env MASTER_ADDR=head MASTER_PORT=1234 OMP_NUM_THREADS=8 CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=1" \
        in r.stdout


@pytest.mark.parametrize("rc,restarts,expect", [
    (75, "0", "scontrol requeue 4242"), (75, "3", "restart 4 of 10"), (75, "10", "already requeued 10 times"),
    (1, "0", "not requeued"), (0, "0", "ranks exited with code 0"),
    # a stop that saved nothing new (runtime.exit_codes.stopped): a requeue would start where this one did
    (138, "0", "the ranks ended by SIGUSR1 without saving anything new"),
    (143, "2", "the ranks ended by SIGTERM without saving anything new")])
def test_requeue_decision(tmp_path, rc, restarts, expect):
    r = _run(tmp_path, V2PE_PYTHON="/bin/true", STUB_RC=str(rc), SLURM_RESTART_COUNT=restarts)
    assert r.returncode == rc and expect in r.stdout + r.stderr, r
    assert ("scontrol requeue" in r.stdout) == (rc == 75 and restarts != "10")
    assert ("USR1 is the time-limit signal" in r.stderr) == (rc == 138)


@pytest.mark.parametrize("limit,spec,warns", [("2:00", "USR1@300", True), ("1-00:00:00", "USR1@300", False)])
def test_warns_at_start_when_the_limit_is_not_longer_than_the_signal_lead(tmp_path, limit, spec, warns):
    r = _run(tmp_path, V2PE_PYTHON=sys.executable, STUB_LIMIT=limit, SBATCH_SIGNAL=spec)
    assert r.returncode == 0, r
    assert ("v2pe: warning: this job's time limit (2:00) is not longer than the lead of its stop signal "
            "(--signal=USR1@300)" in r.stderr) == warns, r.stderr


def test_outside_slurm_it_says_to_use_sbatch(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "slurm" / "train.sbatch"), "recipes/tiny_cpu.yaml"], cwd=tmp_path,
                       env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "submit it with sbatch" in r.stderr, r
