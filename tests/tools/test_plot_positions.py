"""tools/plot_positions.py and benchmarks/v2pe_positions.py run end to end (small inputs)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plot_positions_writes_png(tmp_path):
    tool = load(ROOT / "tools" / "plot_positions.py")
    out = tmp_path / "p.png"
    tool.main(["--out", str(out), "--deltas", "1", "1/16", "--layout", "5", "32", "3"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 5 7 7 7 6 3\n")
    tool.main(["--out", str(tmp_path / "q.png"), "--input-ids", str(ids), "--img-start-id", "5",
               "--img-end-id", "6", "--img-context-id", "7"])
    assert (tmp_path / "q.png").stat().st_size > 1000
    ids.write_text("1 7 3\n")
    with pytest.raises(SystemExit, match="outside any <img>"):
        tool.main(["--out", str(tmp_path / "r.png"), "--input-ids", str(ids), "--img-context-id", "7"])


@pytest.mark.slow
def test_benchmark_loop_reference_agrees_and_script_runs():
    bench = load(ROOT / "benchmarks" / "v2pe_positions.py")
    ids = bench.make_sample(5000, 12, 64, seed=3)
    deltas = np.random.default_rng(0).choice([1.0, 0.5, 1 / 256, 0.25], 12)
    from v2pe_megatron.v2pe import compute_position_ids

    fast = compute_position_ids(ids, img_start_id=bench.IMG_START, img_end_id=bench.IMG_END,
                                img_context_id=bench.IMG_CONTEXT, delta=deltas)
    np.testing.assert_array_equal(bench.loop_positions(ids, deltas), fast)
    # The script itself (own process: it pins its CPU affinity).
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "v2pe_positions.py"), "--tokens", "20000",
                          "--images", "40", "--repeats", "3", "--loop-repeats", "1"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "outputs identical: yes" in res.stdout
