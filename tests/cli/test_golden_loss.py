"""Golden loss: the tiny recipe's first 20 CPU losses, run through ``v2pe-train`` from the recipe
alone, match a stored curve to 1e-5 at every layout: 1 rank, TP=2, PP=2, CP=2 and DP=2 with the
distributed optimizer. Two things make that possible: initial weights that do not depend on the
layout (training/init_weights.py) and global batches made of the same micro-batches at every DP size
(data/loader.py).

The curve (data/golden_tiny_cpu.json) is fp32 on CPU, local spec; regenerate it after a change
that is meant to move it with ``python tests/cli/test_golden_loss.py --regenerate`` (1 rank).
The console prints losses to 5 decimals, so "1e-5" here is one unit of the printed last digit.
Each run takes 5-15 s on 2 cores (start-up dominates; the 20 steps are ~1 s).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "data" / "golden_tiny_cpu.json"
RECIPE = ["tracking.backend=none", "data.seq_length=128", "train.steps=20"]
TOL = 1e-5 + 1e-9  # printed to 5 decimals: rounding both sides may show a 1e-5 step for a smaller gap

LAYOUTS = {
    "tp2": ["launcher.nproc_per_node=2", "parallel.tp=2"],
    "pp2": ["launcher.nproc_per_node=2", "parallel.pp=2"],
    "cp2": ["launcher.nproc_per_node=2", "parallel.cp=2"],
    "dp2_distopt": ["launcher.nproc_per_node=2", "parallel.use_distributed_optimizer=true"],
}


def train_losses(workdir: Path, *overrides: str) -> list[float]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "v2pe_megatron.cli.train", str(ROOT / "recipes/tiny_cpu.yaml"), *RECIPE,
           *overrides]
    r = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [float(x) for x in re.findall(r"step \d+/\d+  loss ([0-9.]+)", r.stdout + r.stderr)]


def _golden() -> list[float]:
    return json.loads(GOLDEN.read_text())["losses"]


def _max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.mark.slow
def test_one_rank_matches_the_stored_curve(tmp_path):
    got = train_losses(tmp_path, "launcher.nproc_per_node=1")
    print(f"1 rank: max |loss - golden| over {len(got)} steps: {_max_diff(got, _golden()):.1e}")
    assert _max_diff(got, _golden()) <= TOL, (got, _golden())


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_matches_the_stored_curve(tmp_path, layout):
    got = train_losses(tmp_path, *LAYOUTS[layout])
    print(f"{layout}: max |loss - golden| over {len(got)} steps: {_max_diff(got, _golden()):.1e}")
    assert _max_diff(got, _golden()) <= TOL, (layout, got, _golden())


if __name__ == "__main__" and "--regenerate" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        losses = train_losses(Path(d), "launcher.nproc_per_node=1")
    GOLDEN.write_text(json.dumps({"recipe": "recipes/tiny_cpu.yaml", "overrides": RECIPE, "device": "cpu",
                                  "losses": losses}, indent=1) + "\n")
    print(f"wrote {len(losses)} losses to {GOLDEN}")
