"""The training CLI under context parallelism: v2pe-train at CP=2 (2 gloo ranks) logs the same loss
and gradient norm at every step as at CP=1, on the tiny InternVL with images and random V2PE deltas."""

from __future__ import annotations

import pytest
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp: Path, *overrides: str) -> list[tuple[float, float]]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "v2pe_megatron.cli.train", str(ROOT / "recipes/tiny_cpu.yaml"),
           "tracking.backend=none", f"checkpoint.dir={tmp / 'ckpt'}", "data.seq_length=128", "train.steps=3",
           "data.global_batch_size=1", "train.seed=5", *overrides]
    r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = re.findall(r"step \d+/\d+  loss ([0-9.]+) .*? grad_norm ([0-9.]+)", r.stdout + r.stderr)
    assert len(steps) == 3, r.stdout[-2000:] + r.stderr[-2000:]
    return [(float(a), float(b)) for a, b in steps]


@pytest.mark.slow
def test_cp2_training_matches_cp1(tmp_path):
    (tmp_path / "cp1").mkdir()
    (tmp_path / "cp2").mkdir()
    cp1 = _run(tmp_path / "cp1", "parallel.cp=1", "launcher.nproc_per_node=1")
    cp2 = _run(tmp_path / "cp2", "parallel.cp=2", "launcher.nproc_per_node=2")
    for (l1, g1), (l2, g2) in zip(cp1, cp2):
        assert abs(l1 - l2) <= 2e-5 * l1 and abs(g1 - g2) <= 2e-3 * g1, (cp1, cp2)  # log precision
