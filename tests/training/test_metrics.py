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


def test_counts_the_pack_tiles_not_the_rank_share():
    """Under CP the loader hands each rank only its share of a micro-batch's tiles (tile_range); the
    step's ViT work is the whole pack's, so every CP rank counts all of its tiles."""
    from v2pe_megatron.parallel.cp_split import tile_share

    batches = synthetic_packs(2, rows=2, seq_length=64, pad_multiple=4, seed=3)
    full = _meter()
    _draw(full, batches)
    want = full.end_step(1, 1.0, tokens=256)["step_flops"]
    counts = []
    for rank in range(2):
        shares = []
        for b in batches:
            lo, hi = tile_share(int(b.pixel_values.shape[0]), 2, rank)
            shares.append(b.replace(pixel_values=b.pixel_values[lo:hi], tile_range=(lo, hi)))
        meter = _meter()
        _draw(meter, shares)
        counts.append(meter.end_step(1, 1.0, tokens=256)["step_flops"])
    assert counts == [want, want]
    # The shares really are partial (the old count, pixel_values.shape[0], would have been lower).
    held = [tile_share(int(b.pixel_values.shape[0]), 2, 0) for b in batches]
    assert any(0 < hi - lo < int(b.pixel_values.shape[0]) for (lo, hi), b in zip(held, batches)), held


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


def _loader_packs(overrides: list[str], cp_rank: int, cp_size: int, n: int) -> list:
    from v2pe_megatron.data.loader import build_train_loader

    loader = build_train_loader(tiny_recipe(*overrides), dp_rank=0, dp_size=1, cp_rank=cp_rank, cp_size=cp_size,
                                prefetch=0)
    it = iter(loader)
    try:
        return [next(it) for _ in range(n)]
    finally:
        if hasattr(loader, "close"):
            loader.close()


def _cp_rank_figures(overrides: list[str], n: int) -> dict:
    """One CP rank: the loader's micro-batches (this rank's tile share), the meter's figures for a
    step this rank timed at 1 s (rank 0) or 2 s (rank 1), then MFU decisions on those clocks."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from v2pe_megatron.runtime import distributed as rt

    rank = dist.get_rank()
    with rt.model_parallel(1, 1, 2):
        batches = _loader_packs(overrides, ps.get_context_parallel_rank(), 2, n)
        meter = StepMeter(tiny_recipe(*overrides), world_size=2, total_steps=10,
                          dp_group=ps.get_data_parallel_group(with_context_parallel=False))
        list(meter.batches(iter(batches), n))
        figures = meter.end_step(1, 1.0 + rank, tokens=512)
        # A peak at which rank 0's own clock (1 s) gives MFU 125% and the mean (1.5 s) 83%: nobody stops.
        meter.peak = figures["step_flops"] / 2 / 1.25
        list(meter.batches(iter(batches), n))
        agreed = meter.end_step(2, 1.0 + rank, tokens=512)
        # Both clocks above the peak: every rank raises, at the same step.
        list(meter.batches(iter(batches), n))
        try:
            meter.end_step(3, 0.1 * (1 + rank), tokens=512)
            raised = None
        except MFUError as e:
            raised = str(e)
    return {"figures": figures, "agreed": agreed, "raised": raised,
            "held_tiles": [0 if b.pixel_values is None else int(b.pixel_values.shape[0]) for b in batches]}


@pytest.mark.slow
def test_cp_ranks_report_the_packs_figures_and_stop_together():
    """CP=2 with images: each rank holds a share of the tiles, every rank reports the same figures,
    equal to the analytic FLOPs of the same packs at CP=1 and their mean step time; an MFU above 100%
    is decided on those shared figures (none or all ranks raise)."""
    from v2pe_megatron.testing.distributed import run_distributed

    overrides, n = ["parallel.cp=2", "data.seq_length=256"], 2
    r0, r1 = run_distributed(_cp_rank_figures, 2, overrides, n, timeout=240)
    whole = _loader_packs(overrides, 0, 1, n)  # the same packs at CP=1 (every tile held)
    tiles = [b.pack_tiles for b in whole]
    assert sum(tiles) > 1 and all(a + b == t for a, b, t in zip(r0["held_tiles"], r1["held_tiles"], tiles))
    assert r0["held_tiles"] != tiles  # rank 0 really holds a part
    lens = [int(x) for b in whole for row in b.seq_lens for x in row.tolist()]
    want = flops.step_flops(tiny_recipe(*overrides).model, lens, sum(tiles))
    assert r0["figures"] == r1["figures"]
    f = r0["figures"]
    assert f["step_flops"] == pytest.approx(want.model, rel=1e-12)
    assert f["step_time_s"] == 1.5 and f["tokens_per_s"] == 512 / 1.5
    assert f["tflops_per_device"] == pytest.approx(want.model / 2 / 1.5 / 1e12, rel=1e-12)
    assert r0["agreed"] == r1["agreed"] and r0["agreed"]["mfu_pct"] == pytest.approx(100 / 1.5 * 1.25)
    assert r0["raised"] and r0["raised"] == r1["raised"] and "> 100% at step 3" in r0["raised"]
