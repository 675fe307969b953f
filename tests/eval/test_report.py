"""Length x depth grids, the console table and the heat map from planted records."""

from __future__ import annotations

import numpy as np
import pytest

from v2pe_megatron.eval.report import delta_label, format_table, length_label, plot_heatmap
from v2pe_megatron.eval.runner import EvalSettings, mlflow_metrics, summarize


def _records():
    recs = []
    for delta in ("1", "1/16"):
        for length in (1024, 4096):
            for depth in (0.0, 0.5, 1.0):
                for task, hit in (("retrieval-text", 1.0), ("counting-image", 0.5)):
                    if length == 4096 and depth == 1.0:
                        continue  # an empty cell
                    # delta 1 fails on long contexts, delta 1/16 does not
                    ok = hit if (delta == "1/16" or length == 1024) else 0.0
                    recs.append({"id": f"{task}-{length}-{depth}", "task": task, "length": length, "depth": depth,
                                 "context_length": length, "placed_depth": [depth], "delta": delta,
                                 "generate": ok, "tf_acc": ok, "tf_logp": -1.0 + ok,
                                 "fits": True})
    return recs


def test_grids_and_table(tmp_path):
    s = EvalSettings(deltas=[1.0, 1 / 16], out_dir=tmp_path, title="planted")
    rep = summarize(_records(), s, [4096, 1024], [0.0, 0.5, 1.0])
    assert rep.lengths == [1024, 4096] and rep.deltas == ["1", "1/16"]
    assert rep.metrics() == ["generate", "tf_acc", "tf_logp"]
    g1 = rep.grid("tf_acc", "1")
    np.testing.assert_allclose(g1.values, [[0.75, 0.75, 0.75], [0.0, 0.0, np.nan]])
    assert g1.counts.tolist() == [[2, 2, 2], [2, 2, 0]]
    assert g1.mean == pytest.approx(0.75 * 6 / 10)
    g16 = rep.grid("generate", "1/16")
    np.testing.assert_allclose(g16.values, [[0.75, 0.75, 0.75], [0.75, 0.75, np.nan]])
    table = format_table(rep)
    assert ("teacher-forced accuracy, delta 1, token grid (our token count x needle depth; "
            "sample-weighted mean 0.450):") in table
    assert "              4K    0.000   0.000       -   0.000" in table
    assert "by task: counting-image 0.300, retrieval-text 0.600" in table
    m = mlflow_metrics(rep)
    assert m["eval/tf_acc/delta_1_16/grid/mean"] == pytest.approx(0.75)
    assert m["eval/generate/delta_1/grid/len_4096/depth_0.5"] == 0.0
    assert "eval/generate/delta_1/grid/len_4096/depth_1" not in m  # empty cells are not metrics
    # the same records under both published aggregations (by hand: delta 1, retrieval-text: 1k cells
    # 1, 1, 1 and 4k cells 0, 0 -> lengths 1.0 and 0.0 -> 0.5; counting-image half of that; V2PE: 3 of 5)
    assert m["eval/tf_acc/delta_1/mmniah/retrieval-text"] == 0.5
    assert m["eval/tf_acc/delta_1/mmniah/overall"] == pytest.approx(0.375)
    assert m["eval/tf_acc/delta_1/v2pe/retrieval-text"] == pytest.approx(0.6)
    assert m["eval/tf_acc/delta_1/v2pe/overall"] == pytest.approx(0.45)
    assert "eval/tf_logp/delta_1/mmniah/overall" not in m  # log-probs are no verdicts
    assert rep.results_json.is_file() and rep.heatmap.is_file()


def test_heatmap_panels_annotations_and_colour_bars(tmp_path):
    from PIL import Image

    from v2pe_megatron.eval.report import heatmap_figure

    rep = summarize(_records(), EvalSettings(deltas=[1.0, 1 / 16]), [1024, 4096], [0.0, 0.5, 1.0])
    fig = heatmap_figure(rep, title="planted")
    panels = [ax for ax in fig.axes if ax.get_title()]
    bars = [ax for ax in fig.axes if not ax.get_title()]
    # rows: generation, teacher-forced accuracy (log-probs are in the table, not the map); one column per delta
    assert [ax.get_title() for ax in panels] == [
        "delta 1   token grid mean 0.45\nV2PE sample-weighted mean 0.45\nMM-NIAH cell mean 0.38",
        "delta 1/16   token grid mean 0.75\nV2PE sample-weighted mean 0.75\nMM-NIAH cell mean 0.75"] * 2
    assert len(bars) == 2 and bars[0].get_ylabel() == "generation score"
    first = panels[0]
    # cells: depth down, length across; every cell carries its value, the empty one a dash
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in first.texts}
    assert texts == {(0, 0): "0.75", (0, 1): "0.75", (0, 2): "0.75", (1, 0): "0.00", (1, 1): "0.00", (1, 2): "-"}
    assert [t.get_text() for t in first.get_xticklabels()] == ["1K", "4K"]
    assert [t.get_text() for t in first.get_yticklabels()] == ["0%", "50%", "100%"]
    assert fig._suptitle.get_text() == "planted: token grid (our token count x needle depth)"
    import matplotlib.pyplot as plt

    plt.close(fig)
    from v2pe_megatron.eval.report import plot_heatmap

    with Image.open(plot_heatmap(rep, tmp_path / "h.png")) as im:
        assert im.size[0] > 600 and im.size[1] > 300


def test_labels():
    assert delta_label(1.0) == "1" and delta_label(1 / 16) == "1/16" and delta_label(0.0625) == "1/16"
    assert delta_label("auto") == "auto"
    assert length_label(1 << 20) == "1M" and length_label(32768) == "32K" and length_label(1000) == "1000"


def _cell_records(cells, delta="1"):
    """One record per (length, column depth, needle depth): the table's input, as the runner makes it."""
    return [{"id": f"s{k}", "task": "retrieval-text", "length": n, "depth": col, "needle_depth": own,
             "delta": delta, "generate": 1.0, "tf_acc": None, "tf_logp": None, "fits": True}
            for k, (n, col, own) in enumerate(cells)]


def test_only_lengths_and_depths_with_samples_are_shown(tmp_path):
    """MM-NIAH's 15 default length bins with samples in two: two rows, no 'nan' anywhere; every depth
    column stays (they are the bins)."""
    from v2pe_megatron.eval.runner import DEFAULT_DEPTHS, MMNIAH_LENGTHS

    recs = _cell_records([(2000, 0.2, 0.2), (8000, 0.2, 0.2), (8000, 0.6, 0.6)])
    rep = summarize(recs, EvalSettings(deltas=[1.0], out_dir=tmp_path), MMNIAH_LENGTHS, DEFAULT_DEPTHS)
    assert rep.lengths == [2000, 8000] and rep.depths == list(DEFAULT_DEPTHS)
    table = format_table(rep)
    assert "nan" not in table
    rows = [line.split() for line in table.splitlines() if line.startswith("   ")]
    assert rows == [["2000", "-", "1.000", "-", "-", "-", "-", "1.000"],
                    ["8000", "-", "1.000", "-", "1.000", "-", "-", "1.000"]]
    assert "depth columns are bins" not in table  # every needle sits at its column's own depth
    assert rep.heatmap.is_file()


def test_nothing_left_writes_results_without_a_heat_map(tmp_path):
    """Every sample longer than the largest bin: results.json says so, no crash drawing an empty map."""
    import json

    rep = summarize([], EvalSettings(deltas=[1.0], out_dir=tmp_path), [1000], [0.0], dropped=3)
    assert rep.heatmap is None and rep.grids == [] and format_table(rep).strip() == ""
    assert json.loads(rep.results_json.read_text())["records"] == []


def test_depth_columns_are_half_open_bins():
    from v2pe_megatron.eval.report import depth_column
    from v2pe_megatron.eval.runner import DEFAULT_DEPTHS

    own = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [depth_column(d, own) for d in own] == own  # a column's own depth is always itself
    assert depth_column(0.5, [1.0, 0.0, 0.5]) == 0.5    # in any order
    # between columns: [halfway below, halfway above); the midpoint counts in the deeper column
    assert [depth_column(d, DEFAULT_DEPTHS) for d in (0.09, 0.1, 0.1 + 0.2, 0.49, 0.5, 0.95, 1.0)] == \
        [0.0, 0.2, 0.4, 0.4, 0.6, 1.0, 1.0]


def test_binned_depths_are_said_with_their_edges():
    from v2pe_megatron.eval.runner import DEFAULT_DEPTHS

    recs = _cell_records([(1000, 0.4, 0.47), (1000, 0.0, 0.0)])
    table = format_table(summarize(recs, EvalSettings(deltas=[1.0]), [1000], DEFAULT_DEPTHS, write=False))
    assert table.splitlines()[0] == ("depth columns are bins of the needles' depth: 0.00 [0, 0.1), 0.20 [0.1, 0.3), "
                                     "0.40 [0.3, 0.5), 0.60 [0.5, 0.7), 0.80 [0.7, 0.9), 1.00 [0.9, 1]")
    row = next(line.split() for line in table.splitlines() if line.strip().startswith("1000"))
    assert row == ["1000", "1.000", "-", "1.000", "-", "-", "-", "1.000"]  # 0.47 counts in the 0.40 column
