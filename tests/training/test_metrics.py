"""The step meter: FLOPs from the micro-batches a step drew, TFLOP/s per device, MFU only against a
known peak (never guessed, never above 100%), ETA."""

from __future__ import annotations

import pytest

from v2pe_megatron import flops
from v2pe_megatron.testing.tiny import synthetic_packs, tiny_recipe
from v2pe_megatron.training.metrics import MFUError, StepMeter


def _meter(*overrides, name=None, world_size=2, total_steps=10):
    return StepMeter(tiny_recipe(*overrides), world_size=world_size, total_steps=total_steps, name=name)


def _draw(meter, batches):
    return list(meter.batches(iter(batches), len(batches)))


def test_counts_the_batches_the_step_drew():
    batches = synthetic_packs(3, rows=2, seq_length=64, pad_multiple=4, seed=3)
    meter = _meter()
    assert _draw(meter, batches) == batches
    lens = [int(n) for b in batches for row in b.seq_lens for n in row.tolist()]
    tiles = sum(int(b.pixel_values.shape[0]) for b in batches)
    assert tiles > 0 and sum(lens) == 3 * 2 * 64
    want = flops.step_flops(tiny_recipe().model, lens, tiles)
    m = meter.end_step(1, 0.5, tokens=384)
    assert m["step_flops"] == want.model
    assert m["tflops_per_device"] == pytest.approx(want.model / 2 / 0.5 / 1e12)
    assert m["tokens_per_s"] == 768
    assert "mfu_pct" not in m   # CPU, no train.peak_tflops: no MFU
    # The count restarts every step.
    _draw(meter, batches[:1])
    assert meter.end_step(2, 0.5, tokens=128)["step_flops"] < want.model


def test_mfu_from_table_or_recipe_and_never_above_100():
    batches = synthetic_packs(1, rows=1, seq_length=64, pad_multiple=4, seed=3)
    meter = _meter("model.dtype=bf16", name="NVIDIA H100 80GB HBM3", world_size=1)
    _draw(meter, batches)
    m = meter.end_step(1, 1e-6, tokens=64)
    assert m["mfu_pct"] == pytest.approx(100 * m["tflops_per_device"] * 1e12 / 989e12)
    assert "mfu_pct" not in _meter(name="NVIDIA H100 80GB HBM3").end_step(1, 1.0, 1)  # fp32: no table peak
    low = _meter("train.peak_tflops=1e-6", world_size=1)
    _draw(low, batches)
    with pytest.raises(MFUError, match="MFU .*% > 100%.*peak 1e-06 TFLOP/s"):
        low.end_step(1, 1.0, tokens=64)


def test_eta_leaves_out_the_first_step():
    meter = _meter(total_steps=10)
    assert meter.end_step(1, 5.0, 1)["eta_s"] == pytest.approx(9 * 5.0)
    assert meter.end_step(2, 1.0, 1)["eta_s"] == pytest.approx(8 * 1.0)
    m = meter.end_step(3, 2.0, 1)
    assert m["eta_s"] == pytest.approx(7 * 1.5)
    assert StepMeter.format(m).endswith("ETA 0:00:10")


def _train_logged(overrides: list[str]) -> list[str]:
    import logging
    from pathlib import Path

    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.training.loop import train

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: lines.append(rec.getMessage())
    logger = logging.getLogger("v2pe_megatron.train")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    train(load_recipe(Path(__file__).parents[2] / "recipes/tiny_cpu.yaml", overrides))
    return lines


@pytest.mark.slow
def test_training_log_and_mlflow_carry_throughput(tmp_path):
    """2 DP ranks, square loss, a per-device peak from the recipe: the log line and MLflow carry
    tokens/s, TFLOP/s per device, MFU and the ETA."""
    import re

    import mlflow

    from v2pe_megatron.testing.distributed import run_distributed

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = ["data.seq_length=128", "train.steps=3", "train.loss_reduction=square", "train.peak_tflops=10",
                 f"tracking.tracking_uri={uri}", "tracking.system_metrics=false"]
    lines = run_distributed(_train_logged, 2, overrides, timeout=300)[0]
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 3
    for line in steps:
        assert re.search(r"tokens/s \d+  TFLOP/s [0-9.e-]+  MFU [0-9.]+%  ETA \d+:\d\d:\d\d  step", line), line
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["v2pe-megatron"], output_format="list")[0]
    client = mlflow.tracking.MlflowClient()
    hist = {k: [m.value for m in client.get_metric_history(run.info.run_id, k)]
            for k in ("tokens_per_s", "tflops_per_device", "mfu_pct", "eta_s", "step_flops")}
    assert all(len(v) == 3 for v in hist.values()), hist
    assert hist["mfu_pct"] == pytest.approx([100 * t / 10 for t in hist["tflops_per_device"]])
    assert hist["eta_s"][-1] == 0
    # Every step draws 2 packs of 128 tokens (one per DP rank), summed over the ranks: at least the
    # LLM's dense and logits work on 256 tokens, at most two whole-row attentions and 2 full packs of tiles.
    low = flops.step_flops(tiny_recipe().model, [1] * 256).model
    high = flops.step_flops(tiny_recipe().model, [128, 128], tiles=2 * 64).model
    assert all(low < f <= high for f in hist["step_flops"]), (low, hist["step_flops"], high)
