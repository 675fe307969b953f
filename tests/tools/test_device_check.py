"""``tools/device_check.sh --dry-run`` passes here: the wheels for the GPU machine are fetched (cached
in .whl/; PyPI is needed the first time) and small enough, they install and import with the repo,
and the check's CPU equivalents pass with every package the GPU image lacks hidden."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_device_check_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    fetch = subprocess.run(["bash", "tools/fetch_device_wheels.sh"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert fetch.returncode == 0, fetch.stdout + fetch.stderr
    assert "total (limit 60 MiB)" in fetch.stdout
    dry = subprocess.run(["bash", "tools/device_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=480)
    out = dry.stdout + dry.stderr
    assert dry.returncode == 0, out[-6000:]
    summary = out[out.rindex("===== SUMMARY"):]
    for part in ("a   setup", "b   gpu tests", "c   bf16 step", "d   v2pe-train"):
        assert f"{part}" in summary and "PASS" in summary.split(part, 1)[1].splitlines()[0], summary
    assert "DALI no, TE no" in summary and "Pillow tiling" in summary  # the GPU machine's situation
    # what the real run will execute is printed
    assert "-m pytest -m gpu tests/" in out and "launcher.backend=nccl" in out
    assert (tmp_path / "device_check.log").read_text().strip().endswith(summary.strip().splitlines()[-1])
    # --bench: setup, then the step benchmark (on CPU: the script imports with the GPU image's packages)
    bench = subprocess.run(["bash", "tools/device_check.sh", "--dry-run", "--bench"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    out = bench.stdout + bench.stderr
    assert bench.returncode == 0, out[-6000:]
    assert "benchmarks/step.py --gpu --steps 3" in out
    summary = out[out.rindex("===== SUMMARY"):]
    assert "e   benchmark    PASS" in summary and "b   gpu tests" not in summary, summary


@pytest.mark.slow
def test_device_check_memory_dry_run(tmp_path):
    """--memory: setup, then the memory check; on the CPU its code runs with the tiny preset and the GPU
    image's packages only, and the saved-tensor bytes match the plan."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    fetch = subprocess.run(["bash", "tools/fetch_device_wheels.sh"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert fetch.returncode == 0, fetch.stdout + fetch.stderr
    mem = subprocess.run(["bash", "tools/device_check.sh", "--dry-run", "--memory"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    out = mem.stdout + mem.stderr
    assert mem.returncode == 0, out[-6000:]
    assert "benchmarks/plan_memory.py --gpu --seq 8192 32768" in out   # what the real run executes
    summary = out[out.rindex("===== SUMMARY"):]
    line = next(x for x in summary.splitlines() if x.startswith("f   memory"))
    assert "PASS" in line and "b   gpu tests" not in summary, summary
    ratios = [float(x) for x in re.findall(r"saved ([0-9.]+)", line)]
    assert len(ratios) == 6 and all(abs(r - 1) < 0.10 for r in ratios), line
    both = subprocess.run(["bash", "tools/device_check.sh", "--bench", "--memory"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert both.returncode == 2 and "separate runs" in both.stderr
