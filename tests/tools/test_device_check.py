"""``tools/device_check.sh --dry-run`` passes here: the wheels for the GPU machine are fetched (cached
in .whl/; PyPI is needed the first time) and small enough, they install and import with the repo,
every command of the real run is printed, and each part's CPU equivalent passes, with every package
the GPU image lacks hidden, through the same parsing of its output as on the GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _fetch(env):
    fetch = subprocess.run(["bash", "tools/fetch_device_wheels.sh"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert fetch.returncode == 0, fetch.stdout + fetch.stderr
    assert "total (limit 60 MiB)" in fetch.stdout


def _line(summary: str, part: str) -> str:
    return next(x for x in summary.splitlines() if re.match(rf"{re.escape(part)}\s", x))


@pytest.mark.slow
def test_device_check_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    _fetch(env)
    dry = subprocess.run(["bash", "tools/device_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=1000)
    out = dry.stdout + dry.stderr
    assert dry.returncode == 0, out[-6000:]
    summary = out[out.rindex("===== SUMMARY"):]
    for part, name in (("a", "setup"), ("1", "train+resume"), ("2", "import-hf"), ("3", "nan-skip"),
                       ("3+", "gpu tests"), ("4", "eval"), ("5", "host syncs"), ("6", "bench")):
        line = _line(summary, part)
        assert re.match(rf"{re.escape(part)}\s+{re.escape(name)}\s+PASS ", line), summary
    assert "DALI no, TE no" in _line(summary, "a")          # the GPU machine's situation
    resume = _line(summary, "1")
    assert "Pillow tiling" in resume and "stopped after 4 and resumed" in resume
    assert "max |loss - uninterrupted| 0.00e+00 (tolerance 1e-05; 8/8 steps" in resume  # the CPU is exact
    assert re.search(r"max relative logits difference [0-9.e-]+, top-1 agreement 1\.0000", _line(summary, "2"))
    nan = _line(summary, "3")
    assert nan.count("bit-identical") == 2 and "DistributedOptimizer" in nan and "bfloat16" in nan
    assert "8 samples x 2 delta(s)" in _line(summary, "4") and "part 1's checkpoint" in _line(summary, "4")
    syncs = _line(summary, "5")
    assert "forward/backward 0," in syncs and "probes seen 4/4+1 backward" in syncs
    bench = _line(summary, "6")
    assert len(re.findall(r"\d+ tokens, 8 tiles, recompute \w+ \(v2pe-plan, one 78 GiB GPU\)", bench)) == 2
    assert "7   not covered   N/A" in summary and "Transformer Engine" in summary and "DALI" in _line(summary, "7")
    # what the real run executes is printed
    for cmd in ("launcher.backend=nccl", "train.exit_after_steps=4", "-m pytest -m gpu",
                "tests/training/test_gpu_nonfinite.py", "tests/training/test_gpu_syncs.py",
                "import-hf --hf $W/hf", "--verify", "v2pe_megatron.cli.data synth $W/needles --needles",
                "v2pe_megatron.cli.eval recipes/tiny_cpu.yaml", "--mode teacher-forced",
                "benchmarks/step.py --gpu --steps 3", "device_parts.py losses --tol 2e-3"):
        assert cmd in out, cmd
    assert (tmp_path / "device_check.log").read_text().strip().endswith(summary.strip().splitlines()[-1])
    refused = subprocess.run(["bash", "tools/device_check.sh", "--bench"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "part 6" in refused.stderr


@pytest.mark.slow
def test_device_check_memory_dry_run(tmp_path):
    """--memory: setup, then the memory check; on the CPU its code runs with the tiny preset and the GPU
    image's packages only, and the saved-tensor bytes match the plan."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    _fetch(env)
    mem = subprocess.run(["bash", "tools/device_check.sh", "--dry-run", "--memory"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    out = mem.stdout + mem.stderr
    assert mem.returncode == 0, out[-6000:]
    assert "benchmarks/plan_memory.py --gpu --seq 8192 32768" in out   # what the real run executes
    summary = out[out.rindex("===== SUMMARY"):]
    line = _line(summary, "m")
    assert "PASS" in line and "train+resume" not in summary, summary
    ratios = [float(x) for x in re.findall(r"saved ([0-9.]+)", line)]
    assert len(ratios) == 6 and all(abs(r - 1) < 0.10 for r in ratios), line
