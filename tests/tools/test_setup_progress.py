"""``make setup`` says what pip is doing (issue 22: it was silent for minutes): one line per phase,
a line per large download, a heartbeat while a phase lasts, pip's errors as they come and the end of
its output when it fails; pip's full output goes to the log file, never to the console."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("setup_progress", REPO / "tools" / "setup_progress.py")
sp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sp)

# pip 26's output for `pip install -e '.[dev]'` into an empty venv, shortened (the real one: ~400 lines)
PIP = """Obtaining file:///home/u/v2pe-megatron
  Installing build dependencies: started
  Installing build dependencies: finished with status 'done'
Collecting megatron-core==0.19.* (from v2pe-megatron==0.1.0)
  Downloading megatron_core-0.19.2-cp312-cp312-manylinux_2_28_x86_64.whl.metadata (15 kB)
Collecting torch>=2.6 (from v2pe-megatron==0.1.0)
  Downloading torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl.metadata (30 kB)
Collecting numpy>=1.26 (from v2pe-megatron==0.1.0)
  Using cached numpy-2.3.4-cp312-cp312-manylinux_2_27_x86_64.whl.metadata (62 kB)
Downloading megatron_core-0.19.2-cp312-cp312-manylinux_2_28_x86_64.whl (2.9 MB)
Downloading torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl (915.3 MB)
Downloading nvidia_cudnn_cu13-9.13.0.50-py3-none-manylinux_2_27_x86_64.whl (1.2 GB)
Building wheels for collected packages: v2pe-megatron
  Building editable for v2pe-megatron (pyproject.toml): started
  Building editable for v2pe-megatron (pyproject.toml): finished with status 'done'
Installing collected packages: numpy, nvidia-cudnn-cu13, torch, megatron-core, v2pe-megatron
Successfully installed megatron-core-0.19.2 numpy-2.3.4 nvidia-cudnn-cu13-9.13.0.50 torch-2.11.0 v2pe-megatron-0.1.0
"""


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_one_line_per_phase_and_big_download():
    clock = Clock()
    c = sp.Condenser("installing", every=20, clock=clock)
    out = []
    for line in PIP.splitlines():
        clock.t += 1
        out += c.feed(line) + c.tick()
    assert [o.split("   ", 1)[1] for o in out] == [
        "resolving the dependencies ...",
        "downloading torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl (915.3 MB)",
        "downloading nvidia_cudnn_cu13-9.13.0.50-py3-none-manylinux_2_27_x86_64.whl (1.2 GB)",
        "building v2pe-megatron",
        "installing 5 packages ...",
        "installed 5 packages"]
    assert c.finish(0) == ["[setup] installing: done in 17s"]


def test_heartbeat_while_a_phase_lasts():
    clock = Clock()
    c = sp.Condenser("installing", every=20, clock=clock)
    assert c.feed("Collecting torch>=2.6 (from v2pe-megatron==0.1.0)") == ["[setup]   resolving the dependencies ..."]
    clock.t = 19
    assert c.tick() == [] and c.feed("Collecting numpy>=1.26") == []
    clock.t = 21
    assert c.tick() == ["[setup]   still resolving (21s; 2 packages so far, last: numpy>=1.26)"]
    clock.t = 30
    assert c.tick() == []  # one line per `every` seconds, not per tick
    c.feed("Installing collected packages: numpy, torch")
    clock.t = 95
    assert c.tick() == ["[setup]   still installing 2 packages (1m35s)"]


def test_failure_shows_pip_errors_and_the_log(tmp_path):
    script = ("import sys; print('Collecting nope'); "
              "print('ERROR: No matching distribution found for nope'); sys.exit(1)")
    out = io.StringIO()
    log = tmp_path / "setup.log"
    assert sp.run([sys.executable, "-c", script], "installing", str(log), out=out) == 1
    text = out.getvalue()
    assert "[setup]   ERROR: No matching distribution found for nope" in text
    assert "pip failed (exit code 1)" in text and f"all of it: {log}" in text
    assert "No matching distribution" in log.read_text()


def test_make_setup_runs_pip_through_it():
    dry = subprocess.run(["make", "-n", "-B", "setup"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert dry.returncode == 0, dry.stderr
    pip = [line for line in dry.stdout.splitlines() if "-m pip install" in line]
    assert len(pip) == 2 and all(" -q" not in line for line in pip)
    assert dry.stdout.count("tools/setup_progress.py --log .venv/setup.log") == 2
