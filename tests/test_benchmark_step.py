"""benchmarks/step.py's building blocks: the synthetic packs are exact (length, tiles, image tokens)
and transformers' model has the shapes of ours (same parameter count), so the side-by-side ratio
compares the same model on the same tokens."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from v2pe_megatron.config import load_recipe
from v2pe_megatron.model.internvl import parameter_count

_spec = importlib.util.spec_from_file_location("bench_step", Path(__file__).parents[1] / "benchmarks" / "step.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _cfg(*extra):
    return load_recipe(None, bench.MID + ["model.language.num_layers=1", "model.vision.num_layers=1", *extra]).model


def test_packs_fill_the_row_with_the_tiles_asked_for():
    cfg = _cfg()
    b = bench.make_batch(cfg, rows=2, seq_length=1024, subsamples=3, tiles=5, pad_multiple=8, seed=0)
    assert b.tokens.shape == (2, 1024)
    assert [r.tolist() for r in b.seq_lens] == [[336, 336, 352]] * 2
    assert b.pixel_values.shape == (10, 3, 224, 224)
    assert int((b.tokens == cfg.img_context_token_id).sum()) == 10 * cfg.num_image_token
    assert (b.position_ids != b.position_ids.round()).any()   # V2PE deltas of 1/4


@pytest.mark.slow  # imports and builds transformers' model: ~3 s, kept out of the quick loop
def test_transformers_model_has_our_shapes():
    cfg = _cfg()
    hf = bench.hf_model(cfg)
    assert sum(p.numel() for p in hf.parameters()) == parameter_count(cfg)
    b = bench.make_batch(cfg, rows=1, seq_length=256, subsamples=1, tiles=1, pad_multiple=2, seed=1)
    with torch.no_grad():
        out = hf(input_ids=b.tokens, pixel_values=b.pixel_values, attention_mask=torch.ones_like(b.tokens),
                 position_ids=b.position_ids.float())
    assert out.logits.shape == (1, 256, cfg.language.vocab_size)


def test_every_gpu_run_fits_one_78_gib_gpu_by_the_plan():
    """What ``benchmarks/step.py --gpu`` runs (``tools/device_check.sh`` part 6): every length fits
    v2pe-plan's memory model on one 78 GiB GPU, read from each run's own recipe (its recompute,
    lengths, dtype, spec, loss chunking), not from the planner's pick; the 32K pack without recompute
    that ``--gpu`` used to run does not (it would have run out of memory)."""
    from v2pe_megatron.plan import GIB

    runs = bench.planned_runs(bench.GPU_2B, bench.GPU_LENGTHS, bench.TILES, bench.GPU_MEM_GIB)
    assert [r["seq"] for r in runs] == [8192, 16384]
    for run in runs:
        recipe = load_recipe(None, run["overrides"])
        assert (recipe.model.preset, recipe.model.dtype, recipe.data.seq_length) == ("internvl2-2b", "bf16", run["seq"])
        mem, usable, reserved = bench.planned_memory(recipe, bench.TILES, 78)
        assert mem.total <= usable, (run["seq"], recipe.train.recompute, mem.gib())
        assert run["planned_peak"] == mem.total - reserved and recipe.train.recompute == run["recompute"]
    old = load_recipe(None, bench.run_overrides(bench.GPU_2B, 32768))
    assert old.train.recompute == "none"
    mem, usable, _ = bench.planned_memory(old, bench.TILES, 78)
    assert mem.total > 150 * GIB > usable
