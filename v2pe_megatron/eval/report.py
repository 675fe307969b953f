"""Per-sample results -> the two published aggregations, our token grid, the console tables and the
heat maps (docs/eval.md "Aggregations").

A record is one (sample, delta) pair: the sample's task, ``context_length`` and ``placed_depth``
(its MM-NIAH meta), its token-grid cell (``length``, ``depth``), the generation score and response
(mode generate), the teacher-forced accuracy (1 when every answer token is the argmax) and mean
log-probability per answer token (mode teacher-forced). The same per-sample verdicts feed:

- **MM-NIAH cell mean** (:func:`mmniah_aggregate`): MM-NIAH's ``calculate_scores.py`` rule. Per task,
  cells of ``meta.context_length`` bins (lower edges 1k ... 64k, :data:`MMNIAH_LENGTH_BINS`) x
  needle-depth bins of 0.2 (the needles' mean depth); samples under 1k are left out and counted; a
  length's score is the mean of its depth cells, the task's the mean over lengths, the overall
  the mean over tasks. Empty cells stay empty (NaN); ``calculate_scores.py`` counts them as 0, and
  that figure is kept too (``calculate_scores_*``): the two agree on a grid without holes.
- **V2PE sample-weighted mean** (:func:`v2pe_aggregate`): V2PE's ``weighted_avg_acc``, every sample
  once (those under 1k too), per task and pooled over tasks.
- **token grid** (:class:`Grid`): our own cells, our token count x the needles' depth, all tasks
  together, sample-weighted (the delta study's view: where a delta breaks down).
"""

from __future__ import annotations

import bisect
import math
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

# metric key -> (title, colour range or None for the data's own)
METRICS = {
    "generate": ("generation score", (0.0, 1.0)),
    "tf_acc": ("teacher-forced accuracy", (0.0, 1.0)),
    "tf_logp": ("teacher-forced mean log-prob per answer token", None),
}


# MM-NIAH's calculate_scores.py (OpenGVLab/MM-NIAH 2fd03dd): its x_bins (lower edges; below the
# first a sample is left out) and y_interval.
MMNIAH_LENGTH_BINS = (1000, 2000, 4000, 8000, 12000, 16000, 24000, 32000, 40000, 48000, 64000)
MMNIAH_DEPTH_STEP = 0.2
MMNIAH_DEPTH_BINS = 5
# metrics that are per-sample verdicts in [0, 1]: the ones the two aggregations average
VERDICT_METRICS = ("generate", "tf_acc")
AGGREGATIONS = {
    "mmniah": "MM-NIAH cell mean",
    "v2pe": "V2PE sample-weighted mean",
    "grid": "token grid",
}


def delta_label(delta: Any) -> str:
    """``1/16`` for 0.0625, ``auto`` for the rule."""
    if isinstance(delta, str):
        return delta
    f = Fraction(float(delta)).limit_denominator(4096)
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


@dataclass
class Grid:
    metric: str
    delta: str
    lengths: list[int]
    depths: list[float]
    values: np.ndarray        # [len(lengths), len(depths)], NaN where no sample fell
    counts: np.ndarray        # samples per cell

    @property
    def mean(self) -> float:
        ok = ~np.isnan(self.values)
        return float((self.values[ok] * self.counts[ok]).sum() / self.counts[ok].sum()) if ok.any() else math.nan


@dataclass
class EvalReport:
    records: list[dict[str, Any]]
    lengths: list[int]
    depths: list[float]
    deltas: list[str]
    modes: list[str]
    grids: list[Grid] = field(default_factory=list)
    aggregates: list[Aggregate] = field(default_factory=list)
    heatmap: Optional[Path] = None
    mmniah_heatmap: Optional[Path] = None
    mmniah_files: list[Path] = field(default_factory=list)   # MM-NIAH's result files (calculate_scores.py)
    results_json: Optional[Path] = None
    run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    dropped: int = 0          # samples outside the length bins
    checkpoint: Optional[Path] = None  # the torch_dist folder the weights came from (None: random)

    def grid(self, metric: str, delta: str) -> Grid:
        return next(g for g in self.grids if g.metric == metric and g.delta == delta)

    def aggregate(self, metric: str, delta: str) -> Optional[Aggregate]:
        return next((a for a in self.aggregates if a.metric == metric and a.delta == delta), None)

    def metrics(self) -> list[str]:
        return [m for m in METRICS if any(g.metric == m for g in self.grids)]


def mmniah_cell(context_length: float, placed_depth: Any) -> Optional[tuple[int, int]]:
    """(length bin, depth bin) of a sample as ``calculate_scores.py`` bins it, or None when it falls
    under the first length bin (or has no depth). Length: the bin whose lower edge is the largest
    <= ``meta.context_length`` (``np.digitize``). Depth: the needles' mean (``sum / len``), 1.0 read
    as 0.99, then ``int(depth / 0.2)``: the same float arithmetic, so 0.6 lands in bin 2, as there."""
    x = bisect.bisect_right(MMNIAH_LENGTH_BINS, context_length)
    if isinstance(placed_depth, list):
        if not placed_depth:
            return None
        y = sum(placed_depth) / len(placed_depth)
    elif placed_depth is None:
        return None
    else:
        y = placed_depth
    if y == 1.0:
        y = 0.99
    if x == 0:
        return None
    return x - 1, int(y / MMNIAH_DEPTH_STEP)


def mmniah_length_label(n: int) -> str:
    """``1k`` ... ``64k`` as MM-NIAH's tables label its bins."""
    return f"{n // 1000}k"


@dataclass
class MMNIAHTask:
    """One task under MM-NIAH's rule: cells [length bin, depth bin], NaN where no sample fell."""

    task: str
    values: np.ndarray        # [11, 5] cell means
    counts: np.ndarray        # samples per cell
    under: int = 0            # samples under the first length bin (left out, as calculate_scores.py does)

    @property
    def length_scores(self) -> np.ndarray:
        """Per length bin, the mean of its populated depth cells (NaN when none is)."""
        with warnings.catch_warnings():  # an all-empty row is NaN, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(self.values, axis=1)

    @property
    def score(self) -> float:
        """The task's figure: the mean of its populated lengths' scores."""
        ls = self.length_scores
        return float(np.mean(ls[~np.isnan(ls)])) if (~np.isnan(ls)).any() else math.nan

    @property
    def calculate_scores_length_scores(self) -> np.ndarray:
        """What calculate_scores.py prints per length: empty cells count as 0."""
        return np.where(self.counts > 0, np.nan_to_num(self.values), 0.0).mean(axis=1)

    @property
    def calculate_scores_score(self) -> float:
        """The mean of those (a leaderboard row's task column)."""
        return float(self.calculate_scores_length_scores.mean())

    @property
    def empty(self) -> int:
        return int((self.counts == 0).sum())


def _verdicts(records: Sequence[dict[str, Any]], metric: str, delta: str) -> list[dict[str, Any]]:
    return [r for r in records if r["delta"] == delta and r.get(metric) is not None]


def mmniah_aggregate(records: Sequence[dict[str, Any]], metric: str, delta: str) -> dict[str, MMNIAHTask]:
    """Per task (in :data:`v2pe_megatron.data.needles.TASKS` order), MM-NIAH's cells of ``metric``."""
    from v2pe_megatron.data.needles import TASKS

    nl, nd = len(MMNIAH_LENGTH_BINS), MMNIAH_DEPTH_BINS
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    under: dict[str, int] = {}
    for r in _verdicts(records, metric, delta):
        t = r["task"]
        sums.setdefault(t, np.zeros((nl, nd)))
        counts.setdefault(t, np.zeros((nl, nd), dtype=np.int64))
        under.setdefault(t, 0)
        cell = mmniah_cell(r.get("context_length", 0), r.get("placed_depth"))
        if cell is None:
            under[t] += 1
            continue
        sums[t][cell] += float(r[metric])
        counts[t][cell] += 1
    order = {t: k for k, t in enumerate(TASKS)}
    out = {}
    for t in sorted(sums, key=lambda t: (order.get(t, len(order)), t)):
        with np.errstate(invalid="ignore", divide="ignore"):
            vals = np.where(counts[t] > 0, sums[t] / np.maximum(counts[t], 1), np.nan)
        out[t] = MMNIAHTask(t, vals, counts[t], under[t])
    return out


def mmniah_overall(tasks: dict[str, MMNIAHTask]) -> float:
    """MM-NIAH's overall: the mean over tasks (of the tasks that hold a populated cell)."""
    v = [x.score for x in tasks.values() if not math.isnan(x.score)]
    return float(np.mean(v)) if v else math.nan


def v2pe_aggregate(records: Sequence[dict[str, Any]], metric: str, delta: str
                   ) -> tuple[dict[str, tuple[float, int]], float, int]:
    """V2PE's ``weighted_avg_acc``: per task (mean, samples) over every sample, and the pooled mean."""
    from v2pe_megatron.data.needles import TASKS

    by: dict[str, list[float]] = {}
    for r in _verdicts(records, metric, delta):
        by.setdefault(r["task"], []).append(float(r[metric]))
    order = {t: k for k, t in enumerate(TASKS)}
    tasks = {t: (float(np.mean(v)), len(v))
             for t, v in sorted(by.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))}
    pooled = [x for v in by.values() for x in v]
    return tasks, (float(np.mean(pooled)) if pooled else math.nan), len(pooled)


@dataclass
class Aggregate:
    """Both published aggregations of one metric at one delta."""

    metric: str
    delta: str
    mmniah: dict[str, MMNIAHTask]
    v2pe: dict[str, tuple[float, int]]
    v2pe_overall: float
    samples: int

    @property
    def mmniah_overall(self) -> float:
        return mmniah_overall(self.mmniah)

    @property
    def calculate_scores_overall(self) -> float:
        v = [x.calculate_scores_score for x in self.mmniah.values()]
        return float(np.mean(v)) if v else math.nan

    @property
    def holes(self) -> bool:
        """Some task has an empty cell: calculate_scores.py's figure then differs (it counts them as 0)."""
        return any(x.empty for x in self.mmniah.values())

    def to_json(self) -> dict[str, Any]:
        def lst(a: np.ndarray) -> list:
            return np.where(np.isnan(a), None, np.round(a, 6)).tolist()

        return {
            "metric": self.metric, "delta": self.delta,
            "mmniah": {
                "name": AGGREGATIONS["mmniah"],
                "rule": "calculate_scores.py: meta.context_length in lower-edge bins, needles' mean depth in bins "
                        "of 0.2, cell = mean verdict, length = mean of its depth cells, task = mean over lengths, "
                        "overall = mean over tasks; empty cells are null (calculate_scores.py counts them as 0: "
                        "calculate_scores_*)",
                "length_bins": list(MMNIAH_LENGTH_BINS),
                "depth_bins": [[round(k * MMNIAH_DEPTH_STEP, 1), round((k + 1) * MMNIAH_DEPTH_STEP, 1)]
                               for k in range(MMNIAH_DEPTH_BINS)],
                "overall": _num(self.mmniah_overall),
                "calculate_scores_overall": _num(self.calculate_scores_overall),
                "tasks": {t: {"score": _num(x.score), "length_scores": lst(x.length_scores),
                              "cells": lst(x.values), "counts": x.counts.tolist(), "under_first_bin": x.under,
                              "empty_cells": x.empty, "calculate_scores_score": _num(x.calculate_scores_score),
                              "calculate_scores_length_scores": lst(x.calculate_scores_length_scores)}
                          for t, x in self.mmniah.items()}},
            "v2pe": {"name": AGGREGATIONS["v2pe"],
                     "rule": "weighted_avg_acc: mean verdict over every sample of a task (those under 1k too); "
                             "overall pooled over every sample of every task",
                     "overall": _num(self.v2pe_overall), "samples": self.samples,
                     "tasks": {t: {"score": _num(m), "samples": n} for t, (m, n) in self.v2pe.items()}},
        }


def _num(x: float) -> Optional[float]:
    return None if math.isnan(x) else round(float(x), 6)


def build_aggregates(records: Sequence[dict[str, Any]], deltas: Sequence[str]) -> list[Aggregate]:
    out = []
    for metric in VERDICT_METRICS:
        for d in deltas:
            if not _verdicts(records, metric, d):
                continue
            tasks, pooled, n = v2pe_aggregate(records, metric, d)
            out.append(Aggregate(metric, d, mmniah_aggregate(records, metric, d), tasks, pooled, n))
    return out


def build_grids(records: Sequence[dict[str, Any]], lengths: Sequence[int], depths: Sequence[float],
                deltas: Sequence[str]) -> list[Grid]:
    li = {int(x): i for i, x in enumerate(lengths)}
    di = {round(float(x), 6): j for j, x in enumerate(depths)}
    out = []
    for metric in METRICS:
        if not any(r.get(metric) is not None for r in records):
            continue
        for d in deltas:
            s = np.zeros((len(lengths), len(depths)))
            n = np.zeros((len(lengths), len(depths)), dtype=np.int64)
            for r in records:
                if r["delta"] != d or r.get(metric) is None:
                    continue
                i, j = li[int(r["length"])], di[round(float(r["depth"]), 6)]
                s[i, j] += r[metric]
                n[i, j] += 1
            with np.errstate(invalid="ignore", divide="ignore"):
                out.append(Grid(metric, d, list(map(int, lengths)), list(map(float, depths)),
                                np.where(n > 0, s / np.maximum(n, 1), np.nan), n))
    return out


def depth_column(depth: float, columns: Sequence[float]) -> float:
    """The depth column a needle depth counts in: each column is the bin from halfway to the column
    below it (inclusive) to halfway to the one above (exclusive), so a depth midway between two
    columns counts in the deeper one, and a column's own value always in itself."""
    cols = sorted(float(c) for c in columns)
    edges = [round((a + b) / 2, 6) for a, b in zip(cols, cols[1:])]
    return cols[int(np.searchsorted(edges, round(float(depth), 6), side="right"))]


def _depth_bins_note(report: EvalReport) -> str:
    """A line saying that the depth columns are bins, when some sample's needle depth is not its
    column's value (MM-NIAH files: the needles' mean depth), else ''."""
    if not any(abs(float(r.get("needle_depth", r["depth"])) - float(r["depth"])) > 0.005 for r in report.records):
        return ""
    cols = report.depths
    edges = [0.0] + [(a + b) / 2 for a, b in zip(cols, cols[1:])] + [1.0]
    bins = [f"{c:.2f} [{lo:g}, {hi:g}{']' if k == len(cols) - 1 else ')'}" for k, (c, lo, hi)
            in enumerate(zip(cols, edges, edges[1:]))]
    return "depth columns are bins of the needles' depth: " + ", ".join(bins)


def task_means(records: Sequence[dict[str, Any]], metric: str, delta: str) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for r in records:
        if r["delta"] == delta and r.get(metric) is not None:
            by.setdefault(r["task"], []).append(float(r[metric]))
    return {t: float(np.mean(v)) for t, v in sorted(by.items())}


def length_label(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}K"
    return str(n)


EMPTY = "—"


def format_aggregates(report: EvalReport) -> str:
    """The two published figures per verdict metric and delta: MM-NIAH's table (tasks down, its
    length bins that hold samples across, a dash where no sample fell) and V2PE's weighted means."""
    lines: list[str] = []
    for a in report.aggregates:
        title = METRICS[a.metric][0]
        held = [i for i in range(len(MMNIAH_LENGTH_BINS)) if any(x.counts[i].any() for x in a.mmniah.values())]
        lines.append(f"{AGGREGATIONS['mmniah']}, {title}, delta {a.delta} (MM-NIAH's calculate_scores.py: "
                     f"meta.context_length bins x needle-depth bins of 0.2; a length = the mean of its depth cells):")
        lines.append(f"  {'task':<16}" + "".join(f"{mmniah_length_label(MMNIAH_LENGTH_BINS[i]):>8}" for i in held)
                     + "   score")
        for t, x in a.mmniah.items():
            ls = x.length_scores
            cells = "".join(f"{EMPTY:>8}" if np.isnan(ls[i]) else f"{ls[i]:8.3f}" for i in held)
            lines.append(f"  {t:<16}{cells}" + (f"{EMPTY:>8}" if math.isnan(x.score) else f"{x.score:8.3f}"))
        ov = a.mmniah_overall
        lines.append(f"  {'overall (mean over tasks)':<{16 + 8 * len(held)}}"
                     + (f"{EMPTY:>8}" if math.isnan(ov) else f"{ov:8.3f}"))
        under = {t: x.under for t, x in a.mmniah.items() if x.under}
        if under:
            first = mmniah_length_label(MMNIAH_LENGTH_BINS[0])
            lines.append(f"  left out: {sum(under.values())} sample(s) under {first} "
                         f"tokens (meta.context_length), as calculate_scores.py drops them: "
                         + ", ".join(f"{t} {n}" for t, n in under.items()))
        if a.holes:
            n = sum(x.empty for x in a.mmniah.values())
            lines.append(f"  {n} empty cell(s) ({EMPTY}); calculate_scores.py counts them as 0 and would print "
                         f"{a.calculate_scores_overall:.3f} overall (by task: "
                         + ", ".join(f"{t} {x.calculate_scores_score:.3f}" for t, x in a.mmniah.items()) + ")")
        lines.append(f"{AGGREGATIONS['v2pe']}, {title}, delta {a.delta} (V2PE's weighted_avg_acc: every sample "
                     f"once): {a.v2pe_overall:.3f} over {a.samples} sample(s)")
        lines.append("  by task: " + ", ".join(f"{t} {m:.3f} ({n})" for t, (m, n) in a.v2pe.items()))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n" if lines else ""


def format_table(report: EvalReport) -> str:
    """The console tables: per metric and delta, the token grid (lengths down, depths across, row
    and grid means), then both published aggregations (:func:`format_aggregates`)."""
    lines = []
    note = _depth_bins_note(report)
    if note and report.grids:
        lines += [note, ""]
    for metric in report.metrics():
        title = METRICS[metric][0]
        for d in report.deltas:
            g = report.grid(metric, d)
            lines.append(f"{title}, delta {d}, {AGGREGATIONS['grid']} (our token count x needle depth; "
                         f"sample-weighted mean {g.mean:.3f}):")
            head = "  length \\ depth " + "".join(f"{x:>8.2f}" for x in g.depths) + "    mean"
            lines.append(head)
            for i, n in enumerate(g.lengths):
                row = g.values[i]
                cells = "".join("       -" if np.isnan(v) else f"{v:8.3f}" for v in row)
                mean = f"{np.nanmean(row):8.3f}" if (~np.isnan(row)).any() else "       -"
                lines.append(f"  {length_label(n):>14} {cells}{mean}")
            tm = task_means(report.records, metric, d)
            if len(tm) > 1:
                lines.append("  by task: " + ", ".join(f"{t} {v:.3f}" for t, v in tm.items()))
            lines.append("")
    agg = format_aggregates(report)
    if agg:
        lines.append(agg)
    return "\n".join(lines).rstrip() + "\n"


def plot_heatmap(report: EvalReport, path: str | Path, title: str = "", figure=None) -> Path:
    """:func:`heatmap_figure` (or ``figure``: a function of (report, title)) saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = (figure or heatmap_figure)(report, title)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def _colour_map():
    import matplotlib

    matplotlib.use("Agg")
    # no sample: grey and unlabelled, never a red 0
    return matplotlib.colormaps["RdYlGn"].with_extremes(bad="#d0d0d0")


def _panel(ax, data: np.ndarray, cmap, rng: tuple[float, float], blank: str = "-"):
    """``data`` [rows, cols] drawn with every cell annotated (``blank`` where NaN)."""
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=rng[0], vmax=rng[1], aspect="auto", origin="upper")
    for j in range(data.shape[0]):
        for i in range(data.shape[1]):
            v = data[j, i]
            # White on the dark ends of the colour map, black on the light middle.
            rgb = cmap(im.norm(v))[:3] if not np.isnan(v) else (0.8, 0.8, 0.8)
            dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.45
            ax.text(i, j, blank if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")
    return im


def _named_figures(report: EvalReport, metric: str, delta: str) -> str:
    a = report.aggregate(metric, delta)
    if a is None:
        return ""
    def f(x: float) -> str:
        return EMPTY if math.isnan(x) else f"{x:.2f}"

    return f"\n{AGGREGATIONS['v2pe']} {f(a.v2pe_overall)}\n{AGGREGATIONS['mmniah']} {f(a.mmniah_overall)}"


def heatmap_figure(report: EvalReport, title: str = ""):
    """The token grid: one row per metric (generation, teacher-forced accuracy), one panel per delta;
    x = context length, y = needle depth, every cell annotated, one colour bar per row; each panel's
    title names the grid's mean and both published figures at that delta."""
    import matplotlib.pyplot as plt

    metrics = [m for m in report.metrics() if m != "tf_logp"] or report.metrics()
    nd = len(report.deltas)
    nl, ndp = len(report.lengths), len(report.depths)
    w = max(3.2, 0.75 * nl + 1.6)
    h = max(2.8, 0.45 * ndp + 1.6)
    named = bool(report.aggregates)
    fig, axes = plt.subplots(len(metrics), nd, figsize=(w * nd + 1.2, (h + (0.6 if named else 0)) * len(metrics)),
                             squeeze=False, constrained_layout=True)
    cmap = _colour_map()
    for r, metric in enumerate(metrics):
        name, rng = METRICS[metric]
        grids = [report.grid(metric, d) for d in report.deltas]
        if rng is None:
            vals = np.concatenate([g.values[~np.isnan(g.values)] for g in grids] or [np.zeros(1)])
            rng = (float(vals.min()), float(vals.max()) if vals.max() > vals.min() else float(vals.min()) + 1)
        im = None
        for c, g in enumerate(grids):
            ax = axes[r][c]
            im = _panel(ax, g.values.T, cmap, rng)  # depth down, length across
            ax.set_xticks(range(nl), [length_label(n) for n in g.lengths], rotation=45 if nl > 6 else 0)
            ax.set_yticks(range(ndp), [f"{x:.0%}" for x in g.depths])
            ax.set_xlabel("context length (tokens)")
            if c == 0:
                ax.set_ylabel(f"{name}\nneedle depth")
            ax.set_title(f"delta {g.delta}   {AGGREGATIONS['grid']} mean {g.mean:.2f}"
                         + _named_figures(report, metric, g.delta), fontsize=9 if named else None)
        fig.colorbar(im, ax=list(axes[r]), shrink=0.9, label=name)
    fig.suptitle((title + ": " if title else "") + f"{AGGREGATIONS['grid']} (our token count x needle depth)")
    return fig


def mmniah_heatmap_figure(report: EvalReport, title: str = ""):
    """MM-NIAH's view of the generation score (teacher-forced accuracy without generation): one row
    per task, one panel per delta; x = MM-NIAH's length bins (meta.context_length), y = its depth
    bins, every cell annotated; cells without a sample grey and blank (calculate_scores.py paints
    them as a red 0)."""
    import matplotlib.pyplot as plt

    metric = next(m for m in VERDICT_METRICS if any(a.metric == m for a in report.aggregates))
    aggs = [report.aggregate(metric, d) for d in report.deltas]
    tasks = list(dict.fromkeys(t for a in aggs if a for t in a.mmniah))
    nl = len(MMNIAH_LENGTH_BINS)
    fig, axes = plt.subplots(len(tasks), len(aggs), figsize=(6.2 * len(aggs) + 1.2, 3.2 * len(tasks)), squeeze=False,
                             constrained_layout=True)
    cmap = _colour_map()
    im = None
    for c, (d, a) in enumerate(zip(report.deltas, aggs)):
        for r, t in enumerate(tasks):
            ax = axes[r][c]
            x = a.mmniah.get(t) if a else None
            data = x.values.T if x is not None else np.full((MMNIAH_DEPTH_BINS, nl), np.nan)
            im = _panel(ax, data, cmap, (0.0, 1.0), blank="")
            ax.set_xticks(range(nl), [mmniah_length_label(n) for n in MMNIAH_LENGTH_BINS], rotation=45)
            ax.set_yticks(range(MMNIAH_DEPTH_BINS), [f"{k * MMNIAH_DEPTH_STEP:.1f}-{(k + 1) * MMNIAH_DEPTH_STEP:.1f}"
                                                     for k in range(MMNIAH_DEPTH_BINS)])
            if c == 0:
                ax.set_ylabel(f"{t}\nneedle depth")
            if r == len(tasks) - 1:
                ax.set_xlabel("meta.context_length (MM-NIAH's bins)")
            score = EMPTY if x is None or math.isnan(x.score) else f"{x.score:.2f}"
            ax.set_title(f"{t}, delta {d}: {AGGREGATIONS['mmniah']} {score}", fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label=METRICS[metric][0])
    overall = ", ".join(f"delta {d} {a.mmniah_overall:.2f}" for d, a in zip(report.deltas, aggs) if a)
    fig.suptitle((title + ": " if title else "") + f"{AGGREGATIONS['mmniah']} of the {METRICS[metric][0]} "
                 f"(overall: {overall}; grey = no sample)")
    return fig
