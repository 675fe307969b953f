"""``slurm/convert.sbatch`` and ``slurm/eval.sbatch`` run their tool's ``--help`` to completion on the
test cluster (``conftest.py``): the scripts find Python, the helper and srun, and pass the arguments
through. One test per script, so that each tool's arrival can be checked on its own (they need
``v2pe_megatron.cli.convert`` and ``v2pe_megatron.cli.eval``)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _help(slurm_cluster, tmp_path, script: str, usage: str) -> None:
    job = slurm_cluster.sbatch("--ntasks=1", str(ROOT / "slurm" / script), "--help", cwd=tmp_path)
    info = slurm_cluster.wait(job, timeout=180)
    out = slurm_cluster.output(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, out[-3000:])
    assert usage in out, out[-3000:]
    assert "ranks exited with code 0" in out


def test_convert_sbatch_runs_the_converter(slurm_cluster, tmp_path):
    _help(slurm_cluster, tmp_path, "convert.sbatch", "import-hf")


def test_eval_sbatch_runs_the_evaluator(slurm_cluster, tmp_path):
    _help(slurm_cluster, tmp_path, "eval.sbatch", "usage:")
