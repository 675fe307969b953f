"""``tools/device_parts.py``, the device check's readers of other commands' output: the resume check
accepts a resumed run on the uninterrupted curve and refuses one that is not (a resume that lost
Adam's moments, as measured on the CPU with this recipe), a run that did not resume, missing steps
and a noise level the tolerance cannot judge; the eval summary reads v2pe-eval's results.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location("device_parts", Path(__file__).parents[2] / "tools" / "device_parts.py")
parts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parts)

# v2pe-train's per-step losses of the check's recipe (tiny, bf16, distributed optimizer, 8 steps), CPU
CURVE = [6.31304, 6.23557, 6.01900, 6.12846, 6.01051, 5.93764, 5.91198, 5.81822]
# the same run resumed at step 4 with Adam's moments zeroed after the load (measured once, CPU)
NO_MOMENTS = [6.01051, 5.93914, 5.92203, 5.84487]


def _log(path: Path, losses: dict[int, float], *, resumed_at: int | None = None, total: int = 8) -> str:
    lines = [f"12:00:00 INFO v2pe_megatron.train: resumed from /x/iter_{resumed_at:07d} at step {resumed_at} (0.4 s)"
             ] if resumed_at else []
    lines += [f"12:00:01 INFO v2pe_megatron.train: step {s}/{total}  loss {v:.5f}  lr 1.0e-03  grad_norm 2.0  "
              f"tokens/s 3000  step 0.15s" for s, v in sorted(losses.items())]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _runs(tmp_path: Path, second_half: list[float], noise: float = 0.0, resumed_at: int | None = 4):
    full = _log(tmp_path / "full.log", dict(enumerate(CURVE, 1)))
    again = _log(tmp_path / "again.log", {s: v + noise for s, v in enumerate(CURVE, 1)})
    half1 = _log(tmp_path / "half1.log", dict(enumerate(CURVE[:4], 1)))
    half2 = _log(tmp_path / "half2.log", dict(enumerate(second_half, 5)), resumed_at=resumed_at)
    return full, again, [half1, half2]


def test_resume_on_the_curve_passes_and_reports_exact_steps(tmp_path):
    full, again, halves = _runs(tmp_path, [x + 3e-4 for x in CURVE[4:]], noise=1e-4)
    ok, line = parts.compare_losses(full, again, halves, 2e-3)
    assert ok, line
    assert "stopped after 4 and resumed" in line and "3.00e-04" in line and "4/8 steps equal" in line
    assert "two uninterrupted runs differ by 1.00e-04" in line and "median step 0.15 s" in line


def test_lost_moments_fail_missing_resume_fails_noise_fails(tmp_path):
    ok, line = parts.compare_losses(*_runs(tmp_path, NO_MOMENTS), 2e-3)
    assert not ok and "2.67e-02 > tolerance" in line
    ok, line = parts.compare_losses(*_runs(tmp_path, CURVE[4:], resumed_at=None), 2e-3)
    assert not ok and "did not resume" in line
    ok, line = parts.compare_losses(*_runs(tmp_path, CURVE[4:7]), 2e-3)
    assert not ok and "not 1..8" in line
    ok, line = parts.compare_losses(*_runs(tmp_path, CURVE[4:], noise=5e-3), 2e-3)
    assert not ok and "cannot judge" in line


def test_eval_summary(tmp_path):
    recs = [{"id": f"s{i}", "delta": d, "tf_acc": float(i % 2), "tf_logp": -1.0 - i} for i in range(4)
            for d in ("1", "auto")]
    (tmp_path / "results.json").write_text(json.dumps({"records": recs}))
    ok, line = parts.summarize_eval(str(tmp_path / "results.json"))
    assert ok and line == ("eval: 4 samples x 2 delta(s) (1, auto), teacher-forced: 8 records, accuracy 0.500, "
                           "mean answer log-prob -2.500")
    recs[0]["tf_logp"] = float("nan")
    (tmp_path / "results.json").write_text(json.dumps({"records": recs}))
    assert not parts.summarize_eval(str(tmp_path / "results.json"))[0]
