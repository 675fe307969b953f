"""The two published aggregations (MM-NIAH's cell mean, V2PE's sample-weighted mean) on the same
per-sample verdicts: against figures computed by hand, against the output of MM-NIAH's own
calculate_scores.py (fixtures/mmniah_official: its commit and how it was run), and a perfect
responder on a generated set (1.0 in every populated cell, empty cells empty)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from v2pe_megatron.data.needles import TASKS
from v2pe_megatron.eval.report import (AGGREGATIONS, MMNIAH_LENGTH_BINS, build_aggregates, format_table,
                                       mmniah_aggregate, mmniah_cell, v2pe_aggregate)
from v2pe_megatron.eval.runner import EvalSettings, mlflow_metrics, summarize

OFFICIAL = Path(__file__).parent / "fixtures" / "mmniah_official"


def _planted(model: str) -> list[dict]:
    """The planted result files as records: the same verdicts calculate_scores.py recomputed."""
    recs = []
    for f in sorted((OFFICIAL / "outputs").glob(f"{model}_*-val.jsonl")):
        task = f.name[len(model) + 1: -len("-val.jsonl")]
        for line in f.read_text().splitlines():
            e = json.loads(line)
            recs.append({"id": f"{task}/{e['question_id']}", "task": task, "delta": "1", "generate": e["verdict"],
                         "context_length": e["context_length"], "placed_depth": e["placed_depth"]})
    return recs


def test_binning_is_calculate_scores_own():
    # lower-edge length bins from meta.context_length; under 1000 left out; 64k and above in the last bin
    assert mmniah_cell(999, [0.5]) is None and mmniah_cell(1000, [0.5]) == (0, 2)
    assert mmniah_cell(1999, 0.1) == (0, 0) and mmniah_cell(2000, 0.1) == (1, 0)
    assert mmniah_cell(64000, 0.1)[0] == mmniah_cell(1_000_000, 0.1)[0] == len(MMNIAH_LENGTH_BINS) - 1
    # depth: the needles' mean, 1.0 read as 0.99, then int(depth / 0.2) in floats: 0.6 / 0.2 = 2.999..
    assert [mmniah_cell(1000, d)[1] for d in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, [0.1, 0.5], [1.0, 1.0])] == \
        [0, 1, 2, 2, 4, 4, 1, 4]
    assert mmniah_cell(5000, []) is None  # no needle depth: no cell


def test_by_hand():
    """retrieval-text of the planted 'holes' model, worked out by hand from its 11 lines:
    under 1k: 2 lines (left out); 1k: depth bin 0 holds 1 and 0, bin 2 holds 1 -> 0.75; 2k: bins 1
    and 2 hold 1 -> 1.0; 8k: bin 4 holds 1 and 0 -> 0.5; 64k: bin 1 holds 1 and 0 -> 0.5."""
    recs = [r for r in _planted("holes") if r["task"] == "retrieval-text"]
    assert len(recs) == 11
    x = mmniah_aggregate(recs, "generate", "1")["retrieval-text"]
    assert x.under == 2
    assert x.values[0, 0] == 0.5 and x.values[0, 2] == 1.0 and x.values[1, 1] == x.values[1, 2] == 1.0
    assert x.values[3, 4] == 0.5 and x.values[10, 1] == 0.5
    assert int((~np.isnan(x.values)).sum()) == 6 and x.empty == 55 - 6  # the rest empty, not 0
    ls = x.length_scores
    assert ls[[0, 1, 3, 10]].tolist() == [0.75, 1.0, 0.5, 0.5] and np.isnan(ls[[2, 4, 5, 6, 7, 8, 9]]).all()
    assert x.score == pytest.approx((0.75 + 1.0 + 0.5 + 0.5) / 4)
    # calculate_scores.py: an empty cell is 0, a length the mean of 5 depth bins, the task of 11 lengths
    assert x.calculate_scores_length_scores[[0, 1, 3, 10]].tolist() == pytest.approx([0.3, 0.4, 0.1, 0.1])
    assert x.calculate_scores_score == pytest.approx(0.9 / 11)
    # V2PE: every line once, those under 1k too: 8 right of 11
    tasks, pooled, n = v2pe_aggregate(recs, "generate", "1")
    assert tasks == {"retrieval-text": (pytest.approx(8 / 11), 11)} and pooled == pytest.approx(8 / 11) and n == 11


@pytest.mark.parametrize("model", ["holes", "full"])
def test_equals_calculate_scores_output(model):
    """The per-length lists and the overall that MM-NIAH's own scorer printed for these verdicts."""
    official = json.loads((OFFICIAL / "official_scores" / model / "scores_val.json").read_text())
    (a,) = build_aggregates(_planted(model), ["1"])
    assert list(a.mmniah) == list(TASKS)
    for t, x in a.mmniah.items():
        assert np.round(x.calculate_scores_length_scores, 6).tolist() == pytest.approx(official[f"{t}-val"], abs=1e-9)
    assert np.mean(official["overall"]) == pytest.approx(a.calculate_scores_overall, abs=1e-6)
    if model == "full":  # no empty cell: our MM-NIAH figure is the official one
        assert not a.holes
        for t, x in a.mmniah.items():
            assert x.score == pytest.approx(np.mean(official[f"{t}-val"]), abs=1e-6)
        assert a.mmniah_overall == pytest.approx(np.mean(official["overall"]), abs=1e-6)
    else:
        assert a.holes and a.mmniah_overall > a.calculate_scores_overall
    # the V2PE figure from the same verdicts, by hand: the pooled mean of every line
    verdicts = [r["generate"] for r in _planted(model)]
    assert a.v2pe_overall == pytest.approx(sum(verdicts) / len(verdicts)) and a.samples == len(verdicts)


def test_named_everywhere_and_empty_cells_empty():
    recs = _planted("holes")
    rep = summarize([{**r, "length": 1000, "depth": 0.0} for r in recs], EvalSettings(deltas=[1.0]), [1000], [0.0],
                    write=False)
    table = format_table(rep)
    assert f"{AGGREGATIONS['mmniah']}, generation score, delta 1 (MM-NIAH's calculate_scores.py" in table
    assert f"{AGGREGATIONS['v2pe']}, generation score, delta 1 (V2PE's weighted_avg_acc" in table
    assert f"generation score, delta 1, {AGGREGATIONS['grid']} (our token count x needle depth" in table
    row = next(line.split() for line in table.splitlines() if line.startswith("  retrieval-text "))
    # held length bins: 1k 2k 8k 64k (4k has no sample in any task and is not shown)
    assert row == ["retrieval-text", "0.750", "1.000", "0.500", "0.500", "0.688"]
    assert "calculate_scores.py counts them as 0 and would print" in table
    agg = json.loads(json.dumps(rep.aggregates[0].to_json()))  # results.json's "aggregations" entry
    assert agg["mmniah"]["name"] == "MM-NIAH cell mean" and agg["v2pe"]["name"] == "V2PE sample-weighted mean"
    cells = agg["mmniah"]["tasks"]["retrieval-text"]["cells"]
    assert cells[0][0] == 0.5 and cells[0][1] is None and cells[2] == [None] * 5  # empty: null, never 0
    assert agg["mmniah"]["tasks"]["retrieval-text"]["under_first_bin"] == 2
    m = mlflow_metrics(rep)
    assert m["eval/generate/delta_1/mmniah/retrieval-text"] == pytest.approx(0.6875)
    assert m["eval/generate/delta_1/v2pe/retrieval-text"] == pytest.approx(8 / 11)
    assert "eval/generate/delta_1/mmniah/retrieval-text/len_4k" not in m  # an empty length is no metric
    assert "eval/generate/delta_1/grid/mean" in m


@pytest.fixture(scope="module")
def perfect(tmp_path_factory):
    """Every task generated at two MM-NIAH length bins (meta.context_length ~1.2k and ~2.5k tokens)
    and two depths, answered by the oracle: the perfect responder."""
    from v2pe_megatron.data.needles import synth_needles
    from v2pe_megatron.data.tiling import make_tiler
    from v2pe_megatron.data.tokenizer import tiny_tokenizer
    from v2pe_megatron.eval.runner import OracleBackend, assign_cells, prepare_sample, run_eval

    tok = tiny_tokenizer()
    lengths, depths = [1200, 2500], [0.0, 1.0]
    samples, _ = synth_needles(lengths, depths, tasks=TASKS, count_tokens=lambda t: len(tok.encode(t)),
                               image_tokens=4, seed=0)
    tiler = make_tiler(56, device="cpu")
    prep = [prepare_sample(s, tok, tiler, image_size=56, num_image_token=4, max_tiles=1, use_thumbnail=True)
            for s in samples]
    kept, _ = assign_cells(prep, lengths, depths)
    settings = EvalSettings(deltas=[1.0], modes=("generate", "teacher-forced"), max_new_tokens=16,
                            out_dir=tmp_path_factory.mktemp("perfect"), model_name="oracle")
    recs = run_eval(kept, settings, OracleBackend(), tok)
    return summarize(recs, settings, lengths, depths)


@pytest.mark.slow
def test_perfect_responder_scores_one_in_every_populated_cell(perfect):
    rep = perfect
    assert {a.metric for a in rep.aggregates} == {"generate", "tf_acc"}
    for a in rep.aggregates:
        assert list(a.mmniah) == list(TASKS)
        for t, x in a.mmniah.items():
            assert x.under == 0 and x.counts.sum() == 4
            held = x.counts > 0
            assert (x.values[held] == 1.0).all() and np.isnan(x.values[~held]).all()  # empty stays empty
            assert held[:2].any(axis=1).all() and not held[2:].any()  # the 1k and 2k bins
            assert x.score == 1.0
            assert x.calculate_scores_score < 1.0  # the official figure counts the empty cells as 0
        assert a.mmniah_overall == 1.0 and a.v2pe_overall == 1.0
        assert all(m == 1.0 for m, _ in a.v2pe.values())
    table = format_table(rep)
    rows = [line.split()[1:] for line in table.splitlines() if line.split()[:1] and line.split()[0] in TASKS]
    assert len(rows) == 2 * len(TASKS) and {v for r in rows for v in r} == {"1.000"}  # 1k, 2k and the task
    res = json.loads(rep.results_json.read_text())
    for agg in res["aggregations"]:
        for t in agg["mmniah"]["tasks"].values():
            flat = [v for row in t["cells"] for v in row]
            assert set(flat) == {1.0, None} and 0 not in flat and 0.0 not in flat
    # the MM-NIAH heat map: populated cells read 1.00, empty ones are blank (grey), never 0
    import matplotlib.pyplot as plt

    from v2pe_megatron.eval.report import mmniah_heatmap_figure

    fig = mmniah_heatmap_figure(rep)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == len(TASKS)
    assert all(ax.get_title().endswith(": MM-NIAH cell mean 1.00") for ax in panels)
    for ax in panels:
        texts = [t.get_text() for t in ax.texts]
        task = ax.get_title().split(",")[0]
        assert texts.count("1.00") == int((~np.isnan(rep.aggregates[0].mmniah[task].values)).sum())
        assert set(texts) == {"1.00", ""}
    plt.close(fig)
    assert rep.heatmap.is_file() and rep.mmniah_heatmap.is_file()


@pytest.mark.slow
def test_perfect_responder_result_files_are_mmniah_shaped(perfect):
    """--out's MM-NIAH result files: named {model}_{task}-{split}.jsonl, the fields of a real output
    line (outputs_example/example-retrieval-text.jsonl, committed) and eval_internvl.py's question."""
    rep = perfect
    names = sorted(p.name for p in rep.mmniah_files)
    assert names == sorted(f"oracle-delta1_{t}-val.jsonl" for t in TASKS)
    example = json.loads((OFFICIAL.parent / "mmniah_output_line.json").read_text())
    for p in rep.mmniah_files:
        model, task = p.name[: -len(".jsonl")].rsplit("_", 1)  # as calculate_scores.py splits it
        assert model == "oracle-delta1" and task.endswith("-val") and task[: -len("-val")] in TASKS
        for line in p.read_text().splitlines():
            e = json.loads(line)
            assert set(example) <= set(e) == set(example) | {"question"}
            assert all(type(e[k]) is type(v) for k, v in example.items() if k != "answer")
            assert isinstance(e["question_id"], int) and e["context_length"] >= 1000
            if "counting" in task:
                assert isinstance(e["answer"], list)
    assert not math.isnan(rep.aggregates[0].mmniah_overall)


def test_result_file_names_split_as_calculate_scores_splits_them():
    from v2pe_megatron.eval.runner import mmniah_result_name

    name = mmniah_result_name("tiny_cpu-iter_0000030", "1/16", "counting-text", "val")
    assert name == "tiny_cpu-iter_0000030-delta1-16_counting-text-val.jsonl"
    model, task = name.replace(".jsonl", "").rsplit("_", 1)
    assert (model, task) == ("tiny_cpu-iter_0000030-delta1-16", "counting-text-val")
