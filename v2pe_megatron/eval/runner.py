"""``v2pe-eval``'s library: needle samples -> tokens, tiles and V2PE positions at each inference delta
-> teacher-forced and/or greedy-generation scores -> length x depth tables, heat map, MLflow.

The model is reached through a *backend*: one call, :meth:`ModelBackend.answer_stats`, returns the
log-probability of the label and the argmax at every loss-mask position of a packed one-sample
micro-batch, in sequence order. Teacher-forced scoring is one such call over prompt + answer (V2PE's
1M-token protocol: one forward, every answer token must be the argmax); greedy generation calls it
once per new token with the mask on the last position (a full forward each time, no KV cache, so it
is for contexts of moderate length; teacher-forced scales to what a forward fits). Under context
parallelism each rank scores the positions of its zigzag share and one all-reduce over the CP group
puts them back in order, so every CP size gives the same numbers. The oracle backend returns the
labels themselves: the pipeline and the scoring, tested without a model that knows anything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, Union

import numpy as np
import torch

from v2pe_megatron.data.needles import PROMPT_STYLES, NeedleSample, PromptStyle, answer_text, prompt_of
from v2pe_megatron.eval.report import (AGGREGATIONS, MMNIAH_LENGTH_BINS, EvalReport, build_aggregates, build_grids,
                                       delta_label, depth_column, mmniah_heatmap_figure, mmniah_length_label,
                                       plot_heatmap)
from v2pe_megatron.eval.scoring import score_response
from v2pe_megatron.parallel.batch import MicroBatch

log = logging.getLogger("v2pe_megatron.eval")

MODES = ("generate", "teacher-forced")
# MM-NIAH's own length bins (tokens), extended to V2PE's 1M: the default for data read from jsonl.
MMNIAH_LENGTHS = (1000, 2000, 4000, 8000, 12000, 16000, 24000, 32000, 40000, 48000, 64000,
                  131072, 262144, 524288, 1048576)
DEFAULT_DEPTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

Delta = Union[float, str]  # a value in (0, 1] or "auto"


@dataclass
class EvalSettings:
    deltas: list[Delta]
    modes: tuple[str, ...] = MODES
    lengths: Optional[list[int]] = None       # length bins (upper edges); None: the samples' own / MM-NIAH's
    depths: Optional[list[float]] = None      # depth columns (report.depth_column); None: the samples' own
    trained_positions: int = 32768            # position range the model was trained on (--delta auto)
    trained_positions_from: str = ""          # where that value came from (console, results.json)
    delta_set: tuple[float, ...] = tuple(1.0 / 2**k for k in range(9))  # what auto chooses from
    prompt_style: str = "mmniah"              # data.needles.PROMPT_STYLES: layout, tiles, new tokens
    max_new_tokens: Optional[int] = None      # None: the style's budget per task kind
    max_tiles_per_image: Optional[int] = None  # None: the style's (MM-NIAH: one 448 px tile per image)
    out_dir: Optional[Path] = None            # heat map and results.json (rank 0)
    title: str = ""
    model_name: str = "model"                 # the {model} of the MM-NIAH result files' names
    split: str = "val"                        # their split (MM-NIAH's scorer reads val, test, rag-val, rag-test)

    def __post_init__(self) -> None:
        # The messages spell the fields as v2pe-eval's flags: that is where a user sets them.
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"mode(s) {bad or self.modes} not in {MODES}")
        if not self.deltas:
            raise ValueError("give at least one delta (e.g. --delta 1 1/16 auto)")
        for d in self.deltas:
            if d != "auto" and not (isinstance(d, float) and 0.0 < d <= 1.0):
                raise ValueError(f"delta {d!r} must be in (0, 1] or 'auto'")
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"--prompt-style {self.prompt_style!r} is not one of {', '.join(PROMPT_STYLES)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens} must be >= 1 (default: the prompt style's "
                             f"budget per task)")
        if self.max_tiles_per_image is None:
            self.max_tiles_per_image = self.style.max_tiles
        if self.max_tiles_per_image < 1:
            raise ValueError(f"--max-tiles-per-image {self.max_tiles_per_image} must be >= 1 "
                             f"(default: the prompt style's; MM-NIAH's is one 448 px tile per image)")
        if self.trained_positions < 1:
            raise ValueError(f"--trained-positions {self.trained_positions} must be >= 1")
        if self.lengths is not None and (not self.lengths or min(self.lengths) < 1):
            raise ValueError(f"--lengths {self.lengths} must be token counts >= 1")
        if self.depths is not None and (not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths)):
            raise ValueError(f"--depths {self.depths} must lie in [0, 1]")

    @property
    def style(self) -> PromptStyle:
        return PROMPT_STYLES[self.prompt_style]

    def new_tokens(self, task: str) -> int:
        """The greedy budget of a sample of ``task``: --max-new-tokens, else the style's."""
        return self.max_new_tokens if self.max_new_tokens is not None else self.style.new_tokens(task)


@dataclass
class Prepared:
    """One sample, tokenized and tiled once for every delta."""

    sample: NeedleSample
    prompt: np.ndarray          # int64: everything up to the answer (the assistant header included)
    answer: np.ndarray          # int64: the answer's tokens (without the closing <|im_end|>)
    pixel_values: np.ndarray    # float32 [T, 3, S, S]
    num_tiles: np.ndarray       # int32 per image
    image_tokens: list[int]     # <IMG_CONTEXT> tokens per image
    length: int = 0             # the grid cell
    depth: float = 0.0
    end_id: int = -1            # the token that closes the answer in the recipe's template (<|im_end|>, <|end|>, </s>)


class Backend(Protocol):
    def answer_stats(self, batch: MicroBatch) -> tuple[np.ndarray, np.ndarray]:
        """(log-prob of the label, argmax id) at each loss-mask position of the whole batch, in order."""


# ---------------------------------------------------------------------------------------------
# Preparing samples
# ---------------------------------------------------------------------------------------------
def prepare_sample(s: NeedleSample, tok, tiler, *, image_size: int, num_image_token: int, max_tiles: int,
                   use_thumbnail: bool, chat=None, style: str = "mmniah") -> Prepared:
    """``chat``: the recipe's ``data.chat.chat_format`` (default: internlm2-chat with InternVL's
    system message); ``style``: the user turn's layout (``data.needles.PROMPT_STYLES``)."""
    from v2pe_megatron.data.chat import tokenize_sample
    from v2pe_megatron.data.tiling import choose_grid, image_size_of, tiles_for

    text, names = prompt_of(s, style)
    if names and s.load_image is None:
        raise ValueError(f"sample {s.id} has images but no way to load them")
    encoded = [s.load_image(n) for n in names]  # type: ignore[misc]
    grids = [choose_grid(*image_size_of(b), min_num=1, max_num=max_tiles, image_size=image_size) for b in encoded]
    tiles = [tiles_for(g, use_thumbnail) for g in grids]
    arrs = tiler(encoded, grids) if encoded else []
    for n, a in zip(names, arrs):
        if isinstance(a, Exception):
            raise ValueError(f"sample {s.id}: image {n}: {a}")
    pix = np.concatenate(arrs) if arrs else np.zeros((0, 3, image_size, image_size), np.float32)
    tk = tokenize_sample(tok, conversations=[{"from": "human", "value": text},
                                             {"from": "gpt", "value": answer_text(s)}],
                         tiles_per_image=tiles, num_image_token=num_image_token, chat=chat)
    tgt = np.flatnonzero(tk.target)
    first, last = int(tgt[0]), int(tgt[-1])  # the last target closes the turn (<|im_end|> / </s>)
    if last == first:
        raise ValueError(f"sample {s.id}: empty answer {s.answer!r}: nothing to score")
    return Prepared(s, tk.ids[:first], tk.ids[first:last], pix.astype(np.float32, copy=False),
                    np.asarray(tiles, np.int32), [t * num_image_token for t in tiles], end_id=int(tk.ids[last]))


def assign_cells(prepared: Sequence[Prepared], lengths: Sequence[int], depths: Sequence[float]
                 ) -> tuple[list[Prepared], int]:
    """Each sample's (length, depth) cell: its generated cell when it has one on the grid, else the
    smallest length bin that holds its prompt, and the depth column whose bin holds its depth
    (:func:`report.depth_column`). Returns (kept, dropped)."""
    lengths, depths = sorted(int(x) for x in lengths), [float(x) for x in depths]
    kept, dropped = [], 0
    for p in prepared:
        s = p.sample
        if s.target_length is not None and int(s.target_length) in lengths:
            length = int(s.target_length)
        else:
            fit = [n for n in lengths if p.prompt.size <= n]
            if not fit:
                dropped += 1
                continue
            length = fit[0]
        depth = depth_column(s.depth, depths)
        kept.append(dataclasses.replace(p, length=length, depth=depth))
    return kept, dropped


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
def one_sample_batch(tokens: np.ndarray, target: np.ndarray, positions: np.ndarray, p: Prepared, deltas: np.ndarray,
                     *, pad_id: int, pad_multiple: int) -> MicroBatch:
    """The packed micro-batch of one sequence (padded to the CP split's multiple), as training packs it."""
    from v2pe_megatron.data.packing import PreparedSample, build_pack, collate, padded_length

    ps = PreparedSample(0, tokens, target, positions, p.pixel_values, p.num_tiles, deltas)
    pack = build_pack([ps], padded_length(tokens.size, pad_multiple), pad_id=pad_id, pad_multiple=pad_multiple,
                      image_shape=tuple(p.pixel_values.shape[1:]) if p.pixel_values.size else (3, 1, 1))
    return collate([pack])


def _positions(tokens: np.ndarray, delta: float, tok) -> np.ndarray:
    from v2pe_megatron.v2pe import compute_position_ids

    return compute_position_ids(tokens, img_start_id=tok.img_start_id, img_end_id=tok.img_end_id,
                                img_context_id=tok.img_context_id, delta=delta)


def resolve_delta(d: Delta, p: Prepared, tok, settings: EvalSettings) -> tuple[float, bool]:
    """(the delta to use, whether the sample's positions stay inside the trained range)."""
    from v2pe_megatron.v2pe import choose_inference_delta, last_position

    ids = np.concatenate([p.prompt, p.answer])
    nonvisual = int(np.count_nonzero(ids != tok.img_context_id))
    if d == "auto":
        c = choose_inference_delta(nonvisual, p.image_tokens, settings.trained_positions, settings.delta_set)
        return c.delta, c.fits
    return float(d), last_position(nonvisual, p.image_tokens, float(d)) < settings.trained_positions


def score(p: Prepared, d: Delta, backend: Backend, tok, settings: EvalSettings, *, pad_multiple: int
          ) -> dict[str, Any]:
    """One record: the sample at one delta, in every mode of ``settings``."""
    delta, fits = resolve_delta(d, p, tok, settings)
    deltas = np.full(p.num_tiles.size, delta)
    full = np.concatenate([p.prompt, p.answer])
    pos = _positions(full, delta, tok)
    s = p.sample
    rec: dict[str, Any] = {"id": s.id, "task": s.task, "length": p.length, "depth": p.depth,
                           "needle_depth": round(s.depth, 4),
                           # MM-NIAH's aggregation bins by these, as the file has them (not our token count)
                           "context_length": int(s.context_length),
                           "placed_depth": s.placed_depth if s.placed_depth is not None else list(s.depths),
                           "question_id": s.qid if s.qid is not None else s.id, "answer": s.answer,
                           "question": s.question,
                           "delta": delta_label(d), "delta_value": delta, "tokens": int(full.size),
                           "images": int(p.num_tiles.size), "last_position": float(pos[-1]), "fits": bool(fits),
                           "generate": None, "response": None, "tf_acc": None, "tf_logp": None}
    if "teacher-forced" in settings.modes:
        target = np.zeros(full.size, bool)
        target[p.prompt.size:] = True
        batch = one_sample_batch(full, target, pos, p, deltas, pad_id=tok.pad_id, pad_multiple=pad_multiple)
        logp, arg = backend.answer_stats(batch)
        rec["tf_acc"] = float(np.array_equal(arg.astype(np.int64), p.answer))
        rec["tf_logp"] = float(np.mean(logp))
    if "generate" in settings.modes:
        # An image token ends the answer too: a generated one would have no pixels behind it.
        stop = {p.end_id, tok.eos_id, tok.img_start_id, tok.img_end_id, tok.img_context_id} - {None}
        # The reference continuation rides along as the label of the scored position (the model
        # ignores labels; the oracle backend answers with them).
        ref = list(p.answer) + [p.end_id]
        prompt_pos = pos[: p.prompt.size]
        out: list[int] = []
        for _ in range(settings.new_tokens(p.sample.task)):
            ids = np.concatenate([p.prompt, np.asarray(out, np.int64)])
            # Generated tokens are text: +1 each after the prompt's last (integral) position.
            gen_pos = prompt_pos[-1] + 1.0 + np.arange(len(out), dtype=np.float64)
            batch = one_sample_batch(ids, np.zeros(ids.size, bool), np.concatenate([prompt_pos, gen_pos]), p, deltas,
                                     pad_id=tok.pad_id, pad_multiple=pad_multiple)
            batch.loss_mask[0, ids.size - 1] = 1.0
            batch.labels[0, ids.size - 1] = ref[len(out)] if len(out) < len(ref) else p.end_id
            nxt = int(backend.answer_stats(batch)[1][0])
            if nxt in stop:
                break
            out.append(nxt)
        rec["response"] = tok.decode(out)
        rec["generate"] = score_response(p.sample.answer, rec["response"])
    return rec


def run_eval(prepared: Sequence[Prepared], settings: EvalSettings, backend: Backend, tok, *, pad_multiple: int = 1,
             shard: tuple[int, int] = (0, 1), progress: bool = False) -> list[dict[str, Any]]:
    """Records of this data-parallel shard's samples (every ``shard[1]``-th from ``shard[0]``)."""
    mine = list(prepared)[shard[0]::shard[1]]
    out, t0 = [], time.time()
    for k, p in enumerate(mine):
        for d in settings.deltas:
            out.append(score(p, d, backend, tok, settings, pad_multiple=pad_multiple))
        if progress:
            log.info("sample %d/%d (%s, %d tokens) done, %.1fs", k + 1, len(mine), p.sample.id,
                     p.prompt.size + p.answer.size, time.time() - t0)
    return out


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
class OracleBackend:
    """Answers with the labels (a perfect model; ``wrong=True``: always one id off, a useless one)."""

    def __init__(self, wrong: bool = False) -> None:
        self.wrong = wrong

    def answer_stats(self, batch: MicroBatch) -> tuple[np.ndarray, np.ndarray]:
        m = batch.loss_mask[0].numpy() > 0
        labels = batch.labels[0].numpy()[m]
        return np.full(labels.size, -5.0 if self.wrong else 0.0), labels + (1 if self.wrong else 0)


class ModelBackend:
    """A megatron InternVL model on this rank's layout (TP x CP, no pipeline)."""

    def __init__(self, model: torch.nn.Module, layout) -> None:
        self.model = model
        self.layout = layout

    @torch.no_grad()
    def answer_stats(self, batch: MicroBatch) -> tuple[np.ndarray, np.ndarray]:
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        from v2pe_megatron.parallel.cp_split import zigzag_index_map
        from v2pe_megatron.training.forward import prepare_batch

        if batch.tokens.shape[0] != 1:
            raise ValueError("answer_stats scores one sequence per micro-batch")
        m = self.model
        p = next(m.parameters())
        cp = self.layout.cp
        b = prepare_batch(batch, self.layout, p.device, p.dtype, m.img_context_token_id)
        wanted = np.flatnonzero(batch.loss_mask[0].numpy() > 0)                     # global, in order
        local = torch.nonzero(b.loss_mask[0] > 0).flatten().to(p.device)
        rank = ps.get_context_parallel_rank() if cp > 1 else 0
        index = zigzag_index_map([int(x) for x in batch.seq_lens[0].tolist()], cp, rank)
        # Only the scored rows go through the output layer: [s_local, V/tp] logits of a 1M-token
        # context would be gigabytes per rank. Under sequence parallelism the output layer gathers the
        # sequence itself, so the rows are picked from its output instead.
        pick = not m.config.sequence_parallel
        hook = (m.language_model.output_layer.register_forward_pre_hook(
            lambda _mod, args: (args[0].index_select(0, local), *args[1:])) if pick else None)
        try:
            logits = m(b.tokens, b.position_ids, b.pixel_values, packed_seq_params=b.packed_seq_params,
                       image_exchange=b.image_exchange, image_token_count=b.num_image_tokens)  # [1, rows, V/tp]
        finally:
            if hook is not None:
                hook.remove()
        slots = torch.as_tensor(np.searchsorted(wanted, index[local.cpu().numpy()]), device=logits.device)
        sel = logits[0] if pick else logits[0, local.to(logits.device)]
        if ps.get_tensor_model_parallel_world_size() > 1:
            sel = tensor_parallel.gather_from_tensor_model_parallel_region(sel)
        lsm = torch.log_softmax(sel[:, : m.vocab_size].float(), dim=-1)
        labels = b.labels[0, local].to(lsm.device)
        out = torch.zeros(2, wanted.size, dtype=torch.float64, device=logits.device)
        out[0, slots] = lsm.gather(1, labels[:, None]).squeeze(1).double()
        out[1, slots] = lsm.argmax(-1).double()  # ids < 2^53: exact in float64
        if cp > 1:  # each position lives on exactly one CP rank: the sum puts them together
            torch.distributed.all_reduce(out, group=ps.get_context_parallel_group())
        out = out.cpu().numpy()
        return out[0], out[1].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def _metric_key(metric: str, delta: str, *parts: str) -> str:
    return "/".join([f"eval/{metric}/delta_{delta.replace('/', '_')}", *parts])


def mlflow_metrics(report: EvalReport) -> dict[str, float]:
    """Every figure under a key that names its aggregation: ``.../grid/...`` (the token grid),
    ``.../mmniah/...`` (MM-NIAH cell mean: overall, per task, per task and length bin) and
    ``.../v2pe/...`` (V2PE sample-weighted mean: overall, per task). Empty cells are no metric."""
    out = {}
    for g in report.grids:
        out[_metric_key(g.metric, g.delta, "grid", "mean")] = g.mean
        for i, n in enumerate(g.lengths):
            for j, x in enumerate(g.depths):
                if g.counts[i, j]:
                    out[_metric_key(g.metric, g.delta, "grid", f"len_{n}", f"depth_{x:g}")] = float(g.values[i, j])
    for a in report.aggregates:
        key = lambda *parts: _metric_key(a.metric, a.delta, *parts)  # noqa: E731
        out[key("mmniah", "overall")] = a.mmniah_overall
        out[key("mmniah", "calculate_scores_overall")] = a.calculate_scores_overall
        for t, x in a.mmniah.items():
            out[key("mmniah", t)] = x.score
            for i, v in enumerate(x.length_scores):
                out[key("mmniah", t, f"len_{mmniah_length_label(MMNIAH_LENGTH_BINS[i])}")] = float(v)
        out[key("v2pe", "overall")] = a.v2pe_overall
        for t, (m, _) in a.v2pe.items():
            out[key("v2pe", t)] = m
    return {k: float(v) for k, v in out.items() if not np.isnan(v)}


def mmniah_result_name(model: str, delta: str, task: str, split: str) -> str:
    """``{model}_{task}-{split}.jsonl``, the name MM-NIAH's calculate_scores.py splits at its last
    ``_`` (so a ``_`` in the model part is fine); the delta joins the model part (one "model" per
    delta), characters a file name would trip on (``/`` of ``1/16``) become ``-``."""
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in f"{model}-delta{delta}")
    return f"{safe}_{task}-{split}.jsonl"


def write_mmniah_results(records: Sequence[dict[str, Any]], folder: Path, model: str, split: str) -> list[Path]:
    """One file per delta and task of the generation records, each line as MM-NIAH's
    eval_internvl.py writes it (question_id, question, answer, response, context_length,
    placed_depth): ``python calculate_scores.py --outputs-dir FOLDER`` scores them."""
    by: dict[Path, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("response") is None:
            continue
        by.setdefault(folder / mmniah_result_name(model, r["delta"], r["task"], split), []).append(r)
    if not by:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    for path, rs in by.items():
        with open(path, "w", encoding="utf-8") as f:
            for r in rs:
                f.write(json.dumps({"question_id": r["question_id"], "question": r["question"], "answer": r["answer"],
                                    "response": r["response"], "context_length": r["context_length"],
                                    "placed_depth": r["placed_depth"]}) + "\n")
    return sorted(by)


def summarize(records: list[dict[str, Any]], settings: EvalSettings, lengths: Sequence[int],
              depths: Sequence[float], *, dropped: int = 0, write: bool = True) -> EvalReport:
    """The token grids and both aggregations from the records; with ``write`` and
    ``settings.out_dir``: results.json, heatmap.png, heatmap_mmniah.png and MM-NIAH's result files
    (``mmniah_outputs/``). The grids have the lengths that hold records (MM-NIAH's 15 default length
    bins would otherwise fill the table and the map with empty rows) and every depth column (they
    are the bins)."""
    deltas = [delta_label(d) for d in settings.deltas]
    held = {int(r["length"]) for r in records}
    rep = EvalReport(records, sorted(int(x) for x in lengths if int(x) in held), sorted(float(x) for x in depths),
                     deltas, list(settings.modes), dropped=dropped)
    rep.grids = build_grids(records, rep.lengths, rep.depths, deltas)
    rep.aggregates = build_aggregates(records, deltas)
    if write and settings.out_dir is not None:
        out = Path(settings.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rep.results_json = out / "results.json"
        rep.results_json.write_text(json.dumps({
            "lengths": rep.lengths, "depths": rep.depths, "deltas": deltas, "modes": rep.modes,
            "trained_positions": settings.trained_positions, "trained_positions_from": settings.trained_positions_from,
            "prompt_style": settings.prompt_style, "max_tiles_per_image": settings.max_tiles_per_image,
            "max_new_tokens": settings.max_new_tokens,
            "aggregations": [a.to_json() for a in rep.aggregates],
            "grid": {"name": AGGREGATIONS["grid"], "rule": "our token count (lengths) x the needles' depth (depths), "
                     "all tasks together; mean = sample-weighted over the grid's samples"},
            "grids": [{"metric": g.metric, "delta": g.delta, "values": np.where(np.isnan(g.values), None, g.values).tolist(),
                       "counts": g.counts.tolist(), "mean": g.mean} for g in rep.grids],
            "records": records}, indent=1))
        if rep.grids:  # nothing to draw when every sample was left out
            rep.heatmap = plot_heatmap(rep, out / "heatmap.png", title=settings.title)
        if rep.aggregates:
            rep.mmniah_heatmap = plot_heatmap(rep, out / "heatmap_mmniah.png", title=settings.title,
                                              figure=mmniah_heatmap_figure)
        rep.mmniah_files = write_mmniah_results(records, out / "mmniah_outputs", settings.model_name, settings.split)
    return rep


def track(report: EvalReport, recipe) -> None:
    """The grids as MLflow metrics and the heat map + results.json as artifacts (through the training
    tracker: same store, same local metrics.jsonl fallback)."""
    from v2pe_megatron.training.tracking import Tracker

    if recipe.tracking.backend != "mlflow":
        return
    if not recipe.tracking.run_name:
        recipe = dataclasses.replace(recipe, tracking=dataclasses.replace(recipe.tracking,
                                                                          run_name=f"eval-{recipe.name}"))
    tracker = Tracker(recipe, active=True, tags={"kind": "eval", "deltas": " ".join(report.deltas),
                                                 "modes": " ".join(report.modes)})
    tracker.log_metrics(mlflow_metrics(report), step=0)
    for f in (report.heatmap, report.mmniah_heatmap, report.results_json):
        if f is not None:
            tracker.log_artifact(f)
    tracker.close()
    report.run_id, report.tracking_uri = tracker.run_id, tracker.uri


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------
@dataclass
class Source:
    """Where the samples come from: an MM-NIAH jsonl file, or generated on the fly."""

    data: Optional[str] = None            # jsonl (MM-NIAH format); None: generate
    image_root: Optional[str] = None
    task: Optional[str] = None            # force the task of every line of ``data``
    tasks: Sequence[str] = field(default_factory=lambda: ("retrieval-text", "retrieval-image"))
    samples_per_cell: int = 1
    seed: int = 0
    image_fraction: float = 0.5
    limit: int = 0                        # at most this many samples (0: all)

    def __post_init__(self) -> None:
        # A negative limit would be a Python slice: -1 silently drops the last sample.
        if self.limit < 0:
            raise ValueError(f"--limit {self.limit} must be >= 0 (0, the default, evaluates every sample)")
        if self.samples_per_cell < 1:
            raise ValueError(f"--samples-per-cell {self.samples_per_cell} must be >= 1")


def load_samples(src: Source, settings: EvalSettings, tok, num_image_token: int
                 ) -> tuple[list[NeedleSample], list[int], list[float]]:
    """(samples, length bins, depth bins)."""
    from v2pe_megatron.data.needles import read_mmniah, synth_needles

    if src.data:
        samples = read_mmniah(src.data, src.image_root, src.task)
        if src.limit:
            samples = samples[: src.limit]
        # A generated set read back (meta.target_length on every line): its own lengths, as generated.
        own = {s.target_length for s in samples}
        lengths = settings.lengths or (sorted(int(n) for n in own) if samples and None not in own
                                       else list(MMNIAH_LENGTHS))
        depths = settings.depths or data_depths(samples)
    else:
        lengths = settings.lengths or [256, 512]
        depths = settings.depths or [0.0, 0.5, 1.0]
        samples, _ = synth_needles(lengths, depths, tasks=src.tasks, samples_per_cell=src.samples_per_cell,
                                   seed=src.seed, count_tokens=lambda t: len(tok.encode(t)),
                                   image_tokens=num_image_token, image_fraction=src.image_fraction)
        if src.limit:
            samples = samples[: src.limit]
    return samples, list(lengths), list(depths)


def data_depths(samples: Sequence[NeedleSample], most: int = 11) -> list[float]:
    """Depth columns for read samples without ``--depths``: their own depths (to the table's two
    decimals) when there are at most ``most``, as in a generated set, so that each shows under its
    own value; else :data:`DEFAULT_DEPTHS` as bins (MM-NIAH's own files: a multi-needle sample's
    depth is its needles' mean, any value). From the samples evaluated (after ``--limit``)."""
    own = sorted({round(s.depth, 2) for s in samples})
    return own if 0 < len(own) <= most else list(DEFAULT_DEPTHS)


@dataclass
class DeltaPlan:
    """The rule's delta for the samples of one length bin: the smallest of their per-sample choices,
    the one value that serves them all (``v2pe-convert export-hf --v2pe-delta``)."""

    length: int
    delta: float
    last_position: float      # the largest last position at that delta
    fits: bool                # every sample stays inside the trained range at that delta
    samples: int


def plan_deltas(recipe, settings: EvalSettings, source: Source) -> list[DeltaPlan]:
    """``--delta auto`` without a model: tokens and tiles are counted (image headers only, nothing is
    decoded) and :func:`v2pe_megatron.v2pe.choose_inference_delta` applied per sample."""
    from v2pe_megatron.data.chat import chat_format, tokenize_sample
    from v2pe_megatron.data.loader import check_tokenizer
    from v2pe_megatron.data.tiling import choose_grid, image_size_of, tiles_for
    from v2pe_megatron.data.tokenizer import build_tokenizer
    from v2pe_megatron.v2pe import choose_inference_delta, last_position

    tok = build_tokenizer(recipe.data.tokenizer_path)
    check_tokenizer(recipe, tok)
    m, d = recipe.model, recipe.data
    samples, lengths, _ = load_samples(source, settings, tok, m.num_image_token)
    by: dict[int, list[tuple[float, int, list[int]]]] = {}
    for s in samples:
        text, names = prompt_of(s, settings.prompt_style)
        tiles = [tiles_for(choose_grid(*image_size_of(s.load_image(n)), min_num=1,  # type: ignore[misc]
                                       max_num=settings.max_tiles_per_image, image_size=m.vision.image_size),
                           d.use_thumbnail) for n in names]
        tk = tokenize_sample(tok, conversations=[{"from": "human", "value": text},
                                                 {"from": "gpt", "value": answer_text(s)}],
                             tiles_per_image=tiles, num_image_token=m.num_image_token, chat=chat_format(d))
        visual = [t * m.num_image_token for t in tiles]
        nonvisual = int(np.count_nonzero(tk.ids != tok.img_context_id))
        if s.target_length is not None and int(s.target_length) in lengths:
            length = int(s.target_length)
        else:
            fit = [n for n in sorted(lengths) if tk.ids.size <= n]
            if not fit:
                continue
            length = fit[0]
        c = choose_inference_delta(nonvisual, visual, settings.trained_positions, settings.delta_set)
        by.setdefault(length, []).append((c.delta, nonvisual, visual))
    plans = []
    for length, items in sorted(by.items()):
        delta = min(x[0] for x in items)
        lasts = [last_position(nv, vis, delta) for _, nv, vis in items]
        plans.append(DeltaPlan(length, delta, max(lasts), max(lasts) < settings.trained_positions, len(items)))
    return plans


def checkpoint_iteration(folder: Path) -> Optional[int]:
    """The training iteration of an ``iter_*`` folder; None for a weights-only one."""
    digits = folder.name[len("iter_"):]
    return int(digits) if folder.name.startswith("iter_") and digits.isdigit() else None


def checkpoint_label(folder: Path) -> str:
    """``iteration 30 (ckpt/run/iter_0000030)``, or ``weights FOLDER`` for a weights-only checkpoint."""
    it = checkpoint_iteration(folder)
    return f"weights {folder}" if it is None else f"iteration {it} ({folder})"


def evaluate(recipe, settings: EvalSettings, source: Source, *, ckpt: Optional[str] = None) -> EvalReport:
    """Run on the current ranks (started by ``v2pe-eval``, torchrun or srun): TP x CP ranks per model
    replica, data parallel over samples. Every rank returns the report; rank 0 writes the files,
    prints nothing (the CLI does) and logs to MLflow."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from v2pe_megatron.config import RecipeError, validate
    from v2pe_megatron.data.chat import chat_format
    from v2pe_megatron.data.loader import check_tokenizer
    from v2pe_megatron.data.tiling import make_tiler
    from v2pe_megatron.data.tokenizer import build_tokenizer
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import resolve_spec
    from v2pe_megatron.runtime import distributed as rt
    from v2pe_megatron.training import checkpointing, init_weights

    with rt.process_group(recipe.launcher.backend, recipe.launcher.timeout_minutes):
        world = dist.get_world_size()
        layout = validate(recipe, world_size=world, spec=resolve_spec(recipe.model.spec, recipe.model.dtype))
        if layout.pp > 1:
            raise RecipeError(f"v2pe-eval needs the whole model on each rank: set parallel.pp=1 (got {layout.pp}); "
                              f"use parallel.tp and parallel.cp to spread a long context")
        rt.initialize_model_parallel(layout.tp, 1, layout.cp, seed=recipe.train.seed,
                                     hierarchical_cp_sizes=list(layout.hierarchical_cp_sizes) or None,
                                     timeout_minutes=recipe.launcher.timeout_minutes)
        model = build_model(recipe.model, layout)
        loaded = None
        if ckpt:
            loaded = checkpointing.load_model_weights(ckpt, [model])
            if dist.get_rank() == 0:
                log.info("loaded %s", checkpoint_label(loaded))
            it = checkpoint_iteration(loaded)
            if it is not None:
                settings = dataclasses.replace(settings, title=f"{settings.title}, iteration {it}")
        else:  # the recipe's initial weights, the same at every layout (tests)
            init_weights.initialize(model, recipe.train.seed)
        model.eval()
        tok = build_tokenizer(recipe.data.tokenizer_path)
        check_tokenizer(recipe, tok)
        m = recipe.model
        samples, lengths, depths = load_samples(source, settings, tok, m.num_image_token)
        tiler = make_tiler(m.vision.image_size, use_thumbnail=recipe.data.use_thumbnail, device="cpu")
        rank0 = dist.get_rank() == 0
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        # Only this replica's samples are tokenized and tiled.
        mine = samples[dp_rank::dp]
        chat = chat_format(recipe.data)
        prepared = [prepare_sample(s, tok, tiler, image_size=m.vision.image_size, num_image_token=m.num_image_token,
                                   max_tiles=settings.max_tiles_per_image, use_thumbnail=recipe.data.use_thumbnail,
                                   chat=chat, style=settings.prompt_style)
                    for s in mine]
        prepared, dropped = assign_cells(prepared, lengths, depths)
        records = run_eval(prepared, settings, ModelBackend(model, layout), tok, pad_multiple=layout.seq_multiple,
                           progress=rank0)
        keep = ps.get_tensor_model_parallel_rank() == 0 and (layout.cp == 1 or ps.get_context_parallel_rank() == 0)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (records if keep else [], dropped if keep else 0))
        records = sorted((r for rs, _ in gathered for r in rs), key=lambda r: (r["id"], r["delta"]))
        dropped = sum(n for _, n in gathered)
        report = summarize(records, settings, lengths, depths, dropped=dropped, write=rank0)
        report.checkpoint = loaded
        if rank0:
            track(report, recipe)
        return report
