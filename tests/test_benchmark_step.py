"""benchmarks/step.py's building blocks: the synthetic packs are exact (length, tiles, image tokens),
transformers' model has the shapes of ours (same parameter count), both sides start from the same
weights and must agree on the step-1 loss before anything is timed, and the steps alternate (ours,
transformers, ours, ...) with the warm-up left out, so the ratio compares the same work."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from v2pe_megatron.config import load_recipe
from v2pe_megatron.model.internvl import parameter_count

# Imported by name from benchmarks/ (on sys.path, which spawned processes inherit): the comparison's
# two sides are functions of this module that run in their own processes.
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
bench = importlib.import_module("step")


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


def _fake_side(losses, times, log=None):
    """A side of the interleaving that answers ("step", i) like the real servers."""
    cpu = [0.0]

    def ask(msg):
        i = msg[1]
        cpu[0] += times[i]
        return {"dt": times[i], "loss": losses[i], "peak_mib": 100.0 + i, "cpu_s": cpu[0]}

    return ask


def test_steps_alternate_and_the_warm_up_is_not_measured():
    log = []
    ours = _fake_side([9.5, 9.4, 9.3, 9.2], [50.0, 1.0, 2.0, 1.0])  # the warm-up step is slow: left out
    theirs = _fake_side([9.5, 9.45, 9.35, 9.25], [60.0, 2.0, 2.0, 3.0])
    res = bench.interleave(ours, theirs, pairs=3, warmup=1, log=log)
    assert log == [("ours", 0), ("theirs", 0), ("ours", 1), ("theirs", 1), ("ours", 2), ("theirs", 2),
                   ("ours", 3), ("theirs", 3)]
    s = bench.summarize(res, cores=2, threads=2, load_before=0.1, load_after=2.0)
    assert s["ratios"] == [2.0, 1.0, 3.0] and s["median"] == 2.0 and (s["min"], s["max"]) == (1.0, 3.0)
    assert (s["peak_ours"], s["peak_theirs"]) == (103.0, 103.0)


def test_unequal_step_1_losses_stop_the_run_before_any_step_is_timed():
    log = []
    ours = _fake_side([9.80, 9.7], [1.0, 1.0])
    theirs = _fake_side([9.87, 9.7], [1.0, 1.0])
    with pytest.raises(bench.LossMismatch, match="step-1 losses differ"):
        bench.interleave(ours, theirs, pairs=3, warmup=1, log=log)
    assert log == [("ours", 0), ("theirs", 0)]
    bench.check_losses(9.804701, 9.804700)  # fp32 noise passes
    with pytest.raises(bench.LossMismatch):
        bench.check_losses(9.8047, 9.8049)


def test_a_busy_machine_gives_no_result():
    assert bench.load_verdict(0.3, 2.1, 0.05, cores=2, threads=2) is None  # after: our own 2 threads
    assert "before > 2 cores" in bench.load_verdict(3.2, 2.1, 0.05, cores=2, threads=2)
    assert "after" in bench.load_verdict(0.3, 4.5, 0.05, cores=2, threads=2)
    assert "other processes used 1.00 cores" in bench.load_verdict(0.3, 2.1, 1.0, cores=2, threads=2)
    # right after a comparison of its own, the load before holds our threads too
    assert bench.load_verdict(3.3, 2.1, 0.02, cores=2, threads=2, ran_before=True) is None
    assert "less our 2 threads" in bench.load_verdict(4.5, 2.1, 0.02, cores=2, threads=2, ran_before=True)


def test_block_causal_mask_is_causal_inside_sub_samples_only():
    m = bench.block_causal_mask(torch.tensor([[2, 3]]), 5)
    want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
                        dtype=torch.bool)
    assert m.shape == (1, 1, 5, 5) and torch.equal(m[0, 0], want)


_TINY = bench.MID + bench.COMMON + ["model.language.num_layers=1", "model.vision.num_layers=1",
                                    "data.seq_length=256", "data.micro_batch_size=1", "data.global_batch_size=1"]


@pytest.mark.slow  # two comparisons of a 1-layer model, each side in its own process: ~25 s
@pytest.mark.timeout(300)
def test_both_sides_start_from_the_same_weights_and_a_changed_weight_fails_the_run():
    """Two sub-samples per pack: ours attends within each, transformers gets the block-causal mask;
    from our weights (through the converter's table) the step-1 losses agree, and the later ones too
    (same optimizer groups). One transformers tensor scaled by 1.05 makes the run fail."""
    res = bench.compare(_TINY, pairs=1, subsamples=2, tiles=1, threads=1)
    lo, lt = [r["loss"] for r in res["ours"]], [r["loss"] for r in res["theirs"]]
    assert len(lo) == len(lt) == 2 and lo[0] == pytest.approx(lt[0], rel=bench.LOSS_RTOL)
    assert lo[1] == pytest.approx(lt[1], rel=1e-4)
    assert res["ready"]["ours"]["params"] == res["ready"]["theirs"]["params"]
    assert all(r["peak_mib"] > 0 for r in res["ours"] + res["theirs"])
    with pytest.raises(bench.LossMismatch, match="step-1 losses differ"):
        bench.compare(_TINY, pairs=1, subsamples=2, tiles=1, threads=1,
                      perturb="model.language_model.layers.0.mlp.down_proj.weight")
