"""The evaluation pipeline with planted predictors (an oracle that answers with the reference and one
that is always wrong), and the model backend against the model's own full logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from v2pe_megatron.data.needles import TASKS, answer_text, synth_needles
from v2pe_megatron.data.tiling import make_tiler
from v2pe_megatron.data.tokenizer import tiny_tokenizer
from v2pe_megatron.eval.runner import (EvalSettings, OracleBackend, assign_cells, one_sample_batch, prepare_sample,
                                       resolve_delta, run_eval, summarize)
from v2pe_megatron.v2pe import compute_position_ids

LENGTHS, DEPTHS = [96, 192], [0.0, 1.0]


@pytest.fixture(scope="module")
def prepared():
    tok = tiny_tokenizer()
    samples, _ = synth_needles(LENGTHS, DEPTHS, tasks=TASKS, count_tokens=lambda t: len(tok.encode(t)),
                               image_tokens=4, seed=0)
    tiler = make_tiler(56, device="cpu")
    prep = [prepare_sample(s, tok, tiler, image_size=56, num_image_token=4, max_tiles=1, use_thumbnail=True)
            for s in samples]
    kept, dropped = assign_cells(prep, LENGTHS, DEPTHS)
    assert dropped == 0 and len(kept) == len(TASKS) * 4
    return tok, kept


def test_prepared_sample_holds_prompt_answer_and_tiles(prepared):
    tok, prep = prepared
    for p in prep:
        assert tok.decode(p.answer) == answer_text(p.sample)
        assert tok.decode(p.prompt[-4:]).endswith("assistant\n")
        n_img = int(np.count_nonzero(p.prompt == tok.img_start_id))
        assert n_img == p.num_tiles.size == p.pixel_values.shape[0]  # one 56 px tile per image
        assert int(np.count_nonzero(p.prompt == tok.img_context_id)) == sum(p.image_tokens) == 4 * n_img
        assert (p.length, p.depth) == (p.sample.target_length, p.sample.target_depth)


def test_batch_scores_the_answer_tokens(prepared):
    tok, prep = prepared
    p = prep[0]
    full = np.concatenate([p.prompt, p.answer])
    target = np.r_[np.zeros(p.prompt.size, bool), np.ones(p.answer.size, bool)]
    pos = compute_position_ids(full, img_start_id=tok.img_start_id, img_end_id=tok.img_end_id,
                               img_context_id=tok.img_context_id, delta=1 / 16)
    b = one_sample_batch(full, target, pos, p, np.full(p.num_tiles.size, 1 / 16), pad_id=tok.pad_id, pad_multiple=8)
    assert b.tokens.shape[1] % 8 == 0 and b.tokens.shape[1] >= full.size
    m = b.loss_mask[0] > 0
    assert b.labels[0][m].tolist() == p.answer.tolist()
    assert torch.nonzero(m).flatten().tolist() == list(range(p.prompt.size - 1, full.size - 1))
    np.testing.assert_array_equal(b.position_ids[0, : full.size].numpy(), pos)


def test_oracle_scores_one_everywhere_and_wrong_scores_zero(prepared, tmp_path):
    tok, prep = prepared
    s = EvalSettings(deltas=[1.0, 1 / 16, "auto"], trained_positions=150, max_new_tokens=12, out_dir=tmp_path)
    recs = run_eval(prep, s, OracleBackend(), tok, pad_multiple=4)
    assert len(recs) == len(prep) * 3
    assert all(r["generate"] == 1.0 and r["tf_acc"] == 1.0 and r["tf_logp"] == 0.0 for r in recs)
    rep = summarize(recs, s, LENGTHS, DEPTHS)
    for g in rep.grids:
        assert g.counts.tolist() == [[len(TASKS)] * 2] * 2
        np.testing.assert_array_equal(g.values, 0.0 if g.metric == "tf_logp" else 1.0)
    assert rep.heatmap.is_file()
    bad = run_eval(prep, s, OracleBackend(wrong=True), tok, pad_multiple=4)
    assert all(r["generate"] == 0.0 and r["tf_acc"] == 0.0 and r["tf_logp"] == -5.0 for r in bad)
    # every record says which delta it ran at; auto follows the rule for its length
    for r in recs:
        if r["delta"] == "auto":
            p = next(q for q in prep if q.sample.id == r["id"])
            assert (r["delta_value"], r["fits"]) == resolve_delta("auto", p, tok, s)
            assert r["fits"] == (r["last_position"] < 150)
    auto = {r["length"]: r["delta_value"] for r in recs if r["delta"] == "auto"}
    assert auto[96] >= auto[192]  # longer contexts need smaller deltas


def test_sharding_covers_every_sample_once(prepared):
    tok, prep = prepared
    s = EvalSettings(deltas=[1.0], modes=("teacher-forced",))
    a = run_eval(prep, s, OracleBackend(), tok, shard=(0, 2))
    b = run_eval(prep, s, OracleBackend(), tok, shard=(1, 2))
    assert sorted(r["id"] for r in a + b) == sorted(p.sample.id for p in prep)


def test_model_backend_matches_full_logits(prepared):
    """answer_stats picks the model's own log-probs and argmax at the answer positions, in order."""
    from v2pe_megatron.eval.runner import ModelBackend
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing.tiny import layout_of, tiny_recipe

    tok, prep = prepared
    p = next(q for q in prep if q.num_tiles.size)
    recipe = tiny_recipe("model.spec=local")
    with model_parallel(seed=3):
        model = build_model(recipe.model, layout_of(recipe)).eval()
        full = np.concatenate([p.prompt, p.answer])
        target = np.r_[np.zeros(p.prompt.size, bool), np.ones(p.answer.size, bool)]
        pos = compute_position_ids(full, img_start_id=tok.img_start_id, img_end_id=tok.img_end_id,
                                   img_context_id=tok.img_context_id, delta=1 / 4)
        b = one_sample_batch(full, target, pos, p, np.full(p.num_tiles.size, 1 / 4), pad_id=tok.pad_id, pad_multiple=1)
        logp, arg = ModelBackend(model, layout_of(recipe)).answer_stats(b)
        ref = torch.log_softmax(model.logits(torch.from_numpy(full)[None], torch.from_numpy(p.pixel_values),
                                             torch.from_numpy(pos)[None]), -1)[0].double()
    rows = np.arange(p.prompt.size - 1, full.size - 1)
    np.testing.assert_allclose(logp, ref[rows, torch.from_numpy(p.answer)].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(arg, ref[rows].argmax(-1).numpy())
    assert (logp < 0).all()


def test_delta_plan_agrees_with_auto_records(prepared):
    """--choose-delta (no model, image headers only) picks per length the smallest delta that the
    evaluation's per-sample rule picked."""
    from v2pe_megatron.eval.runner import Source, plan_deltas
    from v2pe_megatron.testing.tiny import tiny_recipe

    tok, prep = prepared
    s = EvalSettings(deltas=["auto"], modes=("teacher-forced",), lengths=LENGTHS, depths=DEPTHS,
                     trained_positions=150)
    recs = run_eval(prep, s, OracleBackend(), tok)
    plans = plan_deltas(tiny_recipe("model.spec=local"), s, Source(tasks=TASKS, seed=0))
    assert [p.length for p in plans] == LENGTHS and [p.samples for p in plans] == [len(TASKS) * 2] * 2
    for p in plans:
        mine = [r for r in recs if r["length"] == p.length]
        assert p.delta == min(r["delta_value"] for r in mine)
        assert p.fits == (p.last_position < 150)
        assert p.last_position >= max(r["last_position"] for r in mine if r["delta_value"] == p.delta)


def test_read_samples_show_under_their_own_depths(tmp_path):
    """A generated set read back (v2pe-data synth --needles, depths 0 .25 .5 .75 1) gets its own depth
    columns and lengths: 0.5 in the 0.50 column, not in MM-NIAH's 0.40 one. Files whose depths take
    many values (MM-NIAH's needle means) get MM-NIAH's six columns as bins."""
    import dataclasses

    from v2pe_megatron.data.needles import write_needles
    from v2pe_megatron.eval.runner import DEFAULT_DEPTHS, Source, data_depths, load_samples

    tok = tiny_tokenizer()
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    samples, images = synth_needles([96], depths, tasks=["retrieval-text"], count_tokens=lambda t: len(tok.encode(t)),
                                    image_tokens=4, seed=0)
    path = write_needles(tmp_path, samples, images)
    read, lengths, columns = load_samples(Source(data=str(path)), EvalSettings(deltas=[1.0]), tok, 4)
    assert columns == depths and lengths == [96]  # its own cells, not MM-NIAH's 1000-token bin
    tiler = make_tiler(56, device="cpu")
    prep = [prepare_sample(s, tok, tiler, image_size=56, num_image_token=4, max_tiles=1, use_thumbnail=True)
            for s in read]
    kept, _ = assign_cells(prep, [96], columns)
    assert [p.depth for p in kept] == depths
    # a limit counts before the columns are chosen: the columns are those of the samples evaluated
    assert load_samples(Source(data=str(path), limit=2), EvalSettings(deltas=[1.0]), tok, 4)[2] == [0.0, 0.25]
    means = [dataclasses.replace(s, target_depth=None, depths=[k / 13]) for k, s in enumerate(samples * 3)]
    assert data_depths(means) == list(DEFAULT_DEPTHS)
