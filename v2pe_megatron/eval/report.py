"""Per-sample results -> length x depth tables per delta, the console table and the heat map.

A record is one (sample, delta) pair: its grid cell (``length``, ``depth``), the generation score
and response (mode generate), the teacher-forced accuracy (1 when every answer token is the argmax)
and mean log-probability per answer token (mode teacher-forced). A cell's value is the mean over
its records (all tasks together; :func:`task_means` splits by task).
"""

from __future__ import annotations

import math
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
    heatmap: Optional[Path] = None
    results_json: Optional[Path] = None
    run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    dropped: int = 0          # samples outside the length bins
    checkpoint: Optional[Path] = None  # the torch_dist folder the weights came from (None: random)

    def grid(self, metric: str, delta: str) -> Grid:
        return next(g for g in self.grids if g.metric == metric and g.delta == delta)

    def metrics(self) -> list[str]:
        return [m for m in METRICS if any(g.metric == m for g in self.grids)]


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


def format_table(report: EvalReport) -> str:
    """The console table: per metric and delta, lengths down, depths across, row and overall means."""
    lines = []
    note = _depth_bins_note(report)
    if note and report.grids:
        lines += [note, ""]
    for metric in report.metrics():
        title = METRICS[metric][0]
        for d in report.deltas:
            g = report.grid(metric, d)
            lines.append(f"{title}, delta {d} (mean {g.mean:.3f}):")
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
    return "\n".join(lines).rstrip() + "\n"


def plot_heatmap(report: EvalReport, path: str | Path, title: str = "") -> Path:
    """:func:`heatmap_figure` saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = heatmap_figure(report, title)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def heatmap_figure(report: EvalReport, title: str = ""):
    """One row per metric (generation, teacher-forced accuracy), one panel per delta; x = context
    length, y = needle depth, every cell annotated, one colour bar per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in report.metrics() if m != "tf_logp"] or report.metrics()
    nd = len(report.deltas)
    nl, ndp = len(report.lengths), len(report.depths)
    w = max(3.2, 0.75 * nl + 1.6)
    h = max(2.8, 0.45 * ndp + 1.6)
    fig, axes = plt.subplots(len(metrics), nd, figsize=(w * nd + 1.2, h * len(metrics)), squeeze=False,
                             constrained_layout=True)
    cmap = matplotlib.colormaps["RdYlGn"].copy()
    cmap.set_bad("#d0d0d0")
    for r, metric in enumerate(metrics):
        name, rng = METRICS[metric]
        grids = [report.grid(metric, d) for d in report.deltas]
        if rng is None:
            vals = np.concatenate([g.values[~np.isnan(g.values)] for g in grids] or [np.zeros(1)])
            rng = (float(vals.min()), float(vals.max()) if vals.max() > vals.min() else float(vals.min()) + 1)
        im = None
        for c, g in enumerate(grids):
            ax = axes[r][c]
            data = g.values.T  # depth down, length across
            im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=rng[0], vmax=rng[1], aspect="auto",
                           origin="upper")
            for j in range(data.shape[0]):
                for i in range(data.shape[1]):
                    v = data[j, i]
                    # White on the dark ends of the colour map, black on the light middle.
                    rgb = cmap(im.norm(v))[:3] if not np.isnan(v) else (0.8, 0.8, 0.8)
                    dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.45
                    ax.text(i, j, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=9,
                            color="white" if dark else "black")
            ax.set_xticks(range(nl), [length_label(n) for n in g.lengths], rotation=45 if nl > 6 else 0)
            ax.set_yticks(range(ndp), [f"{x:.0%}" for x in g.depths])
            ax.set_xlabel("context length (tokens)")
            if c == 0:
                ax.set_ylabel(f"{name}\nneedle depth")
            ax.set_title(f"delta {g.delta}   mean {g.mean:.2f}")
        fig.colorbar(im, ax=list(axes[r]), shrink=0.9, label=name)
    if title:
        fig.suptitle(title)
    return fig
