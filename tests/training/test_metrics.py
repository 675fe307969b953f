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
