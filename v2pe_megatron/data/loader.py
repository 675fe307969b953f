"""The training data iterator: samples -> tokens + tiles -> packs -> micro-batches.

One global stream, whatever the data-parallel size: an epoch is a seeded permutation of the mixed
index (formats.py), and every DP rank walks all of it, checking each sample cheaply (record,
placeholders, files, image headers, tokens, length: no pixel decoding) and taking the greedy packing
decisions, which need only lengths and tile counts. The packs are numbered, ``micro_batch_size`` of
them make global micro-batch m, and DP rank r decodes (one DALI tiling call per micro-batch) and
yields only micro-batches r, r + dp, r + 2 dp, ... So a step's global batch (dp ranks x
num_microbatches) is the same micro-batches at any DP size, and decoding, the expensive part, is
split dp ways. A sample whose pixels fail to decode (its header was fine) is dropped from its pack,
which keeps the other ranks' plans valid; the pack is then shorter, at every DP size alike.

Under context parallelism (``cp_size`` > 1) the CP ranks of one replica build the same micro-batches
(same tokens, same plan), but each decodes and holds only its share of the micro-batch's tiles,
:func:`v2pe_megatron.parallel.cp_split.tile_share` (the rule the model's feature exchange follows):
images without a tile in the share are not decoded, and of an image across a share boundary only
the share's tiles are kept (copied out of the tiler's output, which is freed). The batch says which
tiles it holds (``MicroBatch.tile_range``). A CP rank cannot drop a sample alone (the others would
not know), so there a decode failure keeps the sample with blank tiles for that image, with a
warning, instead of skipping it.

Skips are counted by the rank that owns the micro-batch being filled when they happen, so the sum
over DP ranks (what the training log reports) counts each skip once.

Resume exactness: a rank yields its micro-batch of a round of dp micro-batches only when the whole
round is planned, and the state it hands out is the position (epoch, index) of the first sample of
the pack still being filled at the end of that round: at a step boundary, the same global position
on every DP rank. Greedy packing restarted at a pack's first sample rebuilds the same packs, and
every step is a pure function of (position, seed) (the V2PE delta draw is keyed by the sample's
global id, never by a running RNG), so a resumed run, at this DP size or another, yields exactly the
micro-batches the uninterrupted one would have. Each rank's state also carries its own skip
counters; :meth:`TrainLoader.load_state_dict` takes all saved ranks' states and gives their sum to
rank 0.

A background thread prepares ``prefetch`` micro-batches ahead; each carries its own state and skip
counters, so what :meth:`TrainLoader.state_dict` and :attr:`TrainLoader.skips` report always
matches what the caller has consumed, not what the thread has read. With ``record_skips`` each also
carries one record per skip counted since the previous one (:attr:`TrainLoader.new_skip_records`:
file, line or key, id, reason, message), which ``v2pe-data inspect --skips-file`` writes out.

Images DALI cannot decode as InternVL (Pillow) would are tiled by Pillow (data/tiling.py) and
counted as ``decoded_by_pillow`` next to the skips; under context parallelism each CP rank decodes,
and counts, only its share, and the reported count is CP rank 0's.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from v2pe_megatron.data.chat import chat_format, check_tokenizer, tokenize_sample
from v2pe_megatron.data.formats import MemoryDataset, MixedIndex, format_source, load_meta
from v2pe_megatron.data.packing import Packer, PreparedSample, build_pack, collate, truncate_or_skip
from v2pe_megatron.data.skips import NoUsableSamplesError, SampleError, SkipCounter
from v2pe_megatron.data.tiling import ImageDecodeError, allow_large_images, image_size_of, make_tiler, sample_tiling
from v2pe_megatron.data.tokenizer import Tokenizer, build_tokenizer

if TYPE_CHECKING:
    from v2pe_megatron.config import DataConfig, Recipe
    from v2pe_megatron.v2pe import DeltaPolicy

log = logging.getLogger("v2pe_megatron.data")

STATE_VERSION = 2  # 2: a global position (any DP size resumes it)
# Give up early when this many samples in a row from the start were all bad.
_ALL_BAD_PROBE = 10_000


@dataclass(frozen=True)
class LoaderSettings:
    """The recipe's ``data`` section as written, plus what the model and the layout decide."""

    data: "DataConfig"
    image_size: int          # model.vision.image_size: tiles are this many pixels square
    num_image_token: int     # LLM tokens per tile (model.num_image_token)
    pad_multiple: int = 1    # the layout's seq_multiple: every sub-sample is padded to it
    window: int = 16         # images per DALI pipeline run (a micro-batch's images go in one call)


@dataclass
class _Prechecked:
    gid: int
    tokens: np.ndarray
    target: np.ndarray
    encoded: list[bytes]
    names: list[str]
    grids: list[tuple[int, int]]
    tile_counts: list[int]
    where: str = ""
    sample_id: str = ""

    @property
    def length(self) -> int:
        return int(self.tokens.size)

    @property
    def tiles(self) -> int:
        return int(sum(self.tile_counts))


class TrainLoader:
    """Iterable of collated micro-batches (see :func:`~v2pe_megatron.data.packing.collate`).

    ``max_epochs=None`` cycles forever (training); with a number it stops after that many epochs,
    flushing the last partial pack and micro-batch (inspection, evaluation)."""

    def __init__(self, index: MixedIndex, tokenizer: Tokenizer, settings: LoaderSettings, policy: "DeltaPolicy",
                 *, dp_rank: int = 0, dp_size: int = 1, max_epochs: int | None = None, prefetch: int = 2,
                 cp_rank: int = 0, cp_size: int = 1, record_skips: bool = False) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        if not 0 <= cp_rank < cp_size:
            raise ValueError(f"cp_rank {cp_rank} not in [0, {cp_size})")
        self.cp_rank, self.cp_size = cp_rank, cp_size
        if len(index) < dp_size:
            raise NoUsableSamplesError(f"the data has {len(index)} sample(s), fewer than the {dp_size} "
                                       f"data-parallel ranks")
        self.index = index
        self.tok = tokenizer
        self.cfg = settings
        self.policy = policy
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.max_epochs = max_epochs
        self.prefetch = prefetch
        # Off in training: the records would grow with every epoch of a run that never ends.
        self.record_skips = record_skips
        self.new_skip_records: list[dict[str, Any]] = []
        allow_large_images()  # data.max_image_pixels is checked on every header instead (_precheck)
        self.tiler = make_tiler(settings.image_size, use_thumbnail=settings.data.use_thumbnail,
                                num_threads=max(1, settings.data.num_workers), max_batch=settings.window,
                                device=settings.data.dali_device)
        self._state: dict[str, Any] = {"epoch": 0, "pos": 0, "skips": SkipCounter().as_dict()}
        self._skips = SkipCounter()
        self.stats = {"samples": 0, "tokens": 0, "tiles": 0, "packs": 0, "micro_batches": 0}
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._gen: Iterator | None = None

    # ----------------------------------------------------------------------------------------
    # State
    # ----------------------------------------------------------------------------------------
    @property
    def skips(self) -> dict[str, int]:
        """Skip counters by reason, as of the last micro-batch handed out."""
        return self._skips.as_dict()

    def _fingerprint(self) -> dict[str, Any]:
        return {"num_samples": len(self.index), "seed": self.cfg.data.seed,
                "seq_length": self.cfg.data.seq_length, "micro_batch_size": self.cfg.data.micro_batch_size}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": int(self._state["epoch"]), "pos": int(self._state["pos"]),
                "skips": dict(self._state["skips"]), "dp_rank": self.dp_rank, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """``state``: one rank's state, or every saved DP rank's (a checkpoint holds them all; the DP
        size may have changed since). The position is global; the skip counters of all saved ranks
        go, summed, to DP rank 0 so that the run's total stays right."""
        states = list(state) if isinstance(state, (list, tuple)) else [state]
        if not states:
            raise ValueError("no data loader state to resume from")
        for st in states:
            if st.get("version") != STATE_VERSION:
                raise ValueError(f"data loader state version {st.get('version')} != {STATE_VERSION} (saved by an "
                                 f"older release whose sample order depended on the DP size)")
            mismatch = {k: (st.get(k), v) for k, v in self._fingerprint().items() if st.get(k) != v}
            if mismatch:
                raise ValueError("data loader state was saved with different data settings (saved, now): "
                                 + ", ".join(f"{k}={a} vs {b}" for k, (a, b) in mismatch.items())
                                 + "; resuming would not replay the same samples")
        where = {(int(st["epoch"]), int(st["pos"])) for st in states}
        if len(where) != 1:
            raise ValueError(f"the saved data-parallel ranks stopped at different positions {sorted(where)}")
        total = SkipCounter()
        if self.dp_rank == 0:
            for st in states:
                for k, v in st["skips"].items():
                    total.counts[k] = total.counts.get(k, 0) + int(v)
        (epoch, pos), = where
        self.close()
        self._state = {"epoch": epoch, "pos": pos, "skips": total.as_dict()}
        self._skips = SkipCounter(total.as_dict())

    # ----------------------------------------------------------------------------------------
    # Iteration
    # ----------------------------------------------------------------------------------------
    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        if self.prefetch <= 0:
            if self._gen is None:
                self._gen = self._produce(dict(self._state))
            item = next(self._gen)
        else:
            if self._thread is None:
                self._start_thread()
            assert self._queue is not None
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            if item is None:
                self.close()
                raise StopIteration
        batch, state, skips, stats, records = item
        self.new_skip_records = records
        self._state = state
        self._skips = SkipCounter(skips)
        self.stats = stats
        return batch

    def _start_thread(self) -> None:
        self._stop.clear()
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        start = dict(self._state)

        def run() -> None:
            try:
                for item in self._produce(start):
                    while not self._stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
                q.put(None)
            except BaseException as e:  # handed to the consumer, raised there
                q.put(e)

        self._queue = q
        self._thread = threading.Thread(target=run, name="v2pe-data", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=30)
        self._thread, self._queue, self._gen = None, None, None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ----------------------------------------------------------------------------------------
    # Producer
    # ----------------------------------------------------------------------------------------
    def _items(self, epoch: int, pos: int) -> Iterator[tuple[tuple[int, int], _Prechecked | SampleError]]:
        while self.max_epochs is None or epoch < self.max_epochs:
            order = self.index.epoch_order(epoch)
            while pos < order.size:
                where = f"#{pos} of epoch {epoch}"
                try:
                    res: _Prechecked | SampleError = self._precheck(int(order[pos]))
                    res.where = where
                except SampleError as e:
                    res = e
                yield (epoch, pos), res
                pos += 1
            epoch, pos = epoch + 1, 0

    def _produce(self, start: dict[str, Any]) -> Iterator[tuple]:
        cfg = self.cfg
        dp, me, mbs = self.dp_size, self.dp_rank, cfg.data.micro_batch_size
        planner = Packer(cfg.data.seq_length, max_tiles_per_pack=cfg.data.max_tiles_per_pack, pad_id=self.tok.pad_id,
                         pad_multiple=cfg.pad_multiple, packing=cfg.data.packing,
                         image_shape=(3, cfg.image_size, cfg.image_size), build=list)
        skips = SkipCounter(start["skips"])
        stats = {"samples": 0, "tokens": 0, "tiles": 0, "packs": 0, "micro_batches": 0}
        pending_state: dict[str, Any] | None = None
        planned: list[list[_Prechecked]] = []   # the packs of global micro-batch ``micro``
        micro = 0                               # counted from ``start``: rounds of dp begin there
        mine: Any = None                        # this rank's decoded micro-batch of the current round
        good_since_start, seen_since_start = 0, 0
        epoch_clean = start["pos"] == 0
        good_in_epoch, cur_epoch = 0, start["epoch"]
        next_cursor = (start["epoch"], start["pos"])
        records: list[dict[str, Any]] = []   # skips counted since the last hand-out (record_skips)

        def count(err: SampleError, where: str = "") -> None:
            skips.add(err, where)
            if self.record_skips:
                records.append(self._record(err))

        def finish_micro() -> bool:
            """Micro-batch ``micro`` is planned: decode it if it is ours. True at the end of a round."""
            nonlocal micro, mine
            if micro % dp == me:
                mine = self._materialize(planned, skips, stats, count)
            planned.clear()
            micro += 1
            return micro % dp == 0

        def state_now() -> dict[str, Any]:
            if planner.pending:
                return dict(pending_state or {})
            return {"epoch": next_cursor[0], "pos": next_cursor[1], "skips": skips.as_dict()}

        def hand_out() -> tuple:
            nonlocal mine
            item, mine = (mine, state_now(), skips.as_dict(), dict(stats), records[:]), None
            records.clear()
            return item

        for (epoch, pos), res in self._items(start["epoch"], start["pos"]):
            if epoch != cur_epoch:
                if epoch_clean and good_in_epoch == 0:
                    raise NoUsableSamplesError(self._all_bad_message(skips))
                cur_epoch, good_in_epoch, epoch_clean = epoch, 0, True
            next_cursor = (epoch, pos + 1)
            seen_since_start += 1
            owner = micro % dp == me
            if isinstance(res, SampleError):
                if owner:
                    count(res, f"#{pos} of epoch {epoch}")  # res.where, when set, wins
                if good_since_start == 0 and seen_since_start >= _ALL_BAD_PROBE:
                    raise NoUsableSamplesError(self._all_bad_message(skips))
                continue
            try:
                packs = planner.add(res)  # checks fit before touching the pending pack
            except SampleError as e:
                if owner:
                    self._mark(e, res.gid, res.sample_id)
                    count(e)
                continue
            good_since_start += 1
            good_in_epoch += 1
            round_done = False
            for p in packs:
                planned.append(p)
                if len(planned) == mbs:
                    round_done = finish_micro() or round_done
            if planner.pending and planner.pending[0] is res:
                # after the decode of the packs ``res`` closed: their decode skips lie before ``res``
                pending_state = {"epoch": epoch, "pos": pos, "skips": skips.as_dict()}
            if round_done:
                yield hand_out()
        if epoch_clean and good_in_epoch == 0 and seen_since_start:
            raise NoUsableSamplesError(self._all_bad_message(skips))
        if planner.pending:
            planned.append(planner.flush())
        if planned:
            finish_micro()
        if mine is not None:
            yield hand_out()

    def _materialize(self, packs: list[list[_Prechecked]], skips: SkipCounter, stats: dict[str, int],
                     count: Callable[[SampleError, str], None]) -> Any:
        """Decode one micro-batch's planned packs (one tiling call) and collate them; under CP only
        this rank's tile share is decoded. ``count`` counts a skip (and records it)."""
        samples = [p for pack in packs for p in pack]
        share = None
        if self.cp_size > 1:
            from v2pe_megatron.parallel.cp_split import tile_share

            share = tile_share(sum(p.tiles for p in samples), self.cp_size, self.cp_rank)
        notes: list[tuple[_Prechecked, str]] = []
        prepared = self._prepare(samples, share, notes)
        for p, detail in notes:
            # where: only for the few notes that are logged
            skips.note("decoded_by_pillow", detail, lambda p=p: self._where(p.gid, p.sample_id))
        built, k = [], 0
        for pack in packs:
            keep = []
            for p in pack:
                res = prepared[k]
                k += 1
                if isinstance(res, SampleError):
                    count(res, p.where)
                    continue
                keep.append(res)
                stats["samples"] += 1
                stats["tokens"] += res.length
                stats["tiles"] += int(res.num_tiles.sum())  # the pack's tiles, whatever share is held
            built.append(build_pack(keep, self.cfg.data.seq_length, pad_id=self.tok.pad_id,
                                    pad_multiple=self.cfg.pad_multiple,
                                    image_shape=(3, self.cfg.image_size, self.cfg.image_size)))
        stats["packs"] += len(built)
        stats["micro_batches"] += 1
        batch = collate(built)
        if share is not None:
            batch = batch.replace(tile_range=share)
        # Page-locked here, in the loader's thread: the step's copies to the GPU are then asynchronous.
        return batch.pin_memory() if torch.cuda.is_available() else batch

    def _all_bad_message(self, skips: SkipCounter) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in skips.nonzero().items()) or "none"
        return (f"no usable sample in the data on dp rank {self.dp_rank}: every sample read was skipped "
                f"({reasons}); check data.meta_path, image roots and data.seq_length / max_tiles_per_pack")

    def _source(self, gid: int) -> dict[str, Any]:
        try:
            return self.index.source(gid)  # a jsonl line number costs a scan of the file up to it
        except Exception:  # noqa: BLE001 - a message must not fail the loader
            return {"sample": gid}

    def _where(self, gid: int, sample_id: str = "", source: dict[str, Any] | None = None) -> str:
        """``<annotation file>:<line> id=<id> (dp rank r)`` for skip messages: what a person opens."""
        loc = format_source(source if source is not None else self._source(gid))
        return f"{loc}{f' id={sample_id}' if sample_id else ''} (dp rank {self.dp_rank})"

    def _mark(self, err: SampleError, gid: int, sample_id: str = "") -> SampleError:
        """Say on ``err`` which sample it is: ``where`` for the log, ``source`` and ``sample_id``
        for the skip records."""
        err.source = self._source(gid)
        err.sample_id = sample_id
        err.where = self._where(gid, sample_id, err.source)
        return err

    @staticmethod
    def _record(err: SampleError) -> dict[str, Any]:
        """One skip as a jsonl record: file, line (or key), id, reason, message."""
        return {**err.source, "id": err.sample_id or None, "reason": err.reason, "message": err.detail}

    def _precheck(self, gid: int) -> _Prechecked:
        try:
            ds, raw = self.index.read(gid)
        except SampleError as e:
            self._mark(e, gid)
            raise
        try:
            res = self._precheck_sample(gid, ds, raw)
        except SampleError as e:
            self._mark(e, gid, raw.id)
            raise
        res.sample_id = raw.id or ""
        return res

    def _precheck_sample(self, gid: int, ds, raw) -> _Prechecked:
        cfg = self.cfg
        limit = cfg.data.max_image_pixels
        encoded, sizes = [], []
        for im in raw.images:
            b = im.load()
            try:
                w, h = image_size_of(b)
            except ImageDecodeError as e:
                raise SampleError("corrupt_image", f"{im.name}: {e}") from e
            if limit and w * h > limit:  # before any decoder allocates w*h*3 bytes
                raise SampleError("oversized_image", f"{im.name}: {w}x{h} = {w * h} pixels > "
                                  f"data.max_image_pixels={limit} (raise it, or 0 for no limit)")
            encoded.append(b)
            sizes.append((w, h))
        grids, tiles = sample_tiling(sizes, min_num=cfg.data.min_dynamic_patch,
                                     max_num=ds.max_dynamic_patch or cfg.data.max_dynamic_patch,
                                     image_size=cfg.image_size, use_thumbnail=cfg.data.use_thumbnail)
        tk = tokenize_sample(self.tok, conversations=raw.conversations, text=raw.text, tiles_per_image=tiles,
                             num_image_token=cfg.num_image_token, chat=chat_format(cfg.data))
        tokens, target, n_img = truncate_or_skip(tk.ids, tk.target, cfg.data.seq_length, cfg.data.overlong,
                                                 img_start_id=self.tok.img_start_id, img_end_id=self.tok.img_end_id)
        if not target[1:].any():
            raise SampleError("no_loss_tokens", f"{tk.ids.size} tokens, none left to train on")
        if sum(tiles[:n_img]) > cfg.data.max_tiles_per_pack:
            raise SampleError("too_many_tiles", f"{sum(tiles[:n_img])} tiles > max_tiles_per_pack={cfg.data.max_tiles_per_pack}")
        return _Prechecked(gid, tokens, target, encoded[:n_img], [im.name for im in raw.images[:n_img]],
                           grids[:n_img], tiles[:n_img])

    def _prepare(self, pre: list[_Prechecked], share: tuple[int, int] | None = None,
                 notes: list[tuple[_Prechecked, str]] | None = None) -> list[PreparedSample | SampleError]:
        """Decoded samples; with ``share`` (a CP rank's [start, stop) of the micro-batch's tiles) only
        the tiles inside it are decoded and kept, and a decode failure blanks instead of skipping.
        ``notes`` gains (sample, "<image>: why") for each image of a kept sample that Pillow tiled."""
        from v2pe_megatron.v2pe import compute_position_ids

        # (lo, hi): the tiles of each image (in micro-batch order) this rank keeps.
        keep, off = [], 0
        for p in pre:
            for t in p.tile_counts:
                keep.append((0, t) if share is None else (max(share[0] - off, 0), max(min(share[1] - off, t), 0)))
                off += t
        flat_enc = [b for p in pre for b in p.encoded]
        flat_grid = [g for p in pre for g in p.grids]
        todo = [i for i, (lo, hi) in enumerate(keep) if hi > lo]
        fallbacks: list[tuple[int, str]] = []
        tiled = self.tiler([flat_enc[i] for i in todo], [flat_grid[i] for i in todo],
                           fallbacks=fallbacks) if todo else []
        decoded = dict(zip(todo, tiled))
        by_pillow = {todo[j]: why for j, why in fallbacks}
        s = self.cfg.image_size
        out: list[PreparedSample | SampleError] = []
        k = 0
        for p in pre:
            ids = range(k, k + len(p.encoded))
            k += len(p.encoded)
            arrs = [decoded.get(i) for i in ids]
            bad = next(((n, a) for n, a in zip(p.names, arrs) if isinstance(a, ImageDecodeError)), None)
            if bad is not None and share is None:
                out.append(self._mark(SampleError("corrupt_image", f"{bad[0]}: {bad[1]}"), p.gid, p.sample_id))
                continue
            if notes is not None:
                notes.extend((p, f"{n}: {by_pillow[i]}") for i, n in zip(ids, p.names) if i in by_pillow)
            pieces = []
            for i, n, a in zip(ids, p.names, arrs):
                lo, hi = keep[i]
                if hi <= lo:
                    continue
                if isinstance(a, ImageDecodeError):
                    log.warning("image %s of %s failed to decode (%s): kept as blank tiles, since a context-"
                                "parallel rank cannot drop a sample the other ranks hold", n, self._where(p.gid), a)
                    a = np.zeros((hi - lo, 3, s, s), np.float32)
                    lo, hi = 0, hi - lo
                # Part of an image: copy the share's tiles so the rest of the tiler's output is freed.
                pieces.append(a if (lo, hi) == (0, a.shape[0]) else a[lo:hi].copy())
            arrs = pieces
            n = len(p.encoded)
            deltas = np.asarray(self.policy.deltas(n, p.gid), dtype=np.float64)
            pos = compute_position_ids(p.tokens, img_start_id=self.tok.img_start_id, img_end_id=self.tok.img_end_id,
                                       img_context_id=self.tok.img_context_id, delta=deltas if n else 1.0)
            # A lone image stays a view of DALI's (read-only) output; build_pack makes the one copy.
            pix = arrs[0] if len(arrs) == 1 else np.concatenate(arrs) if arrs else np.zeros((0, 3, s, s), np.float32)
            out.append(PreparedSample(p.gid, p.tokens, p.target, pos, pix,
                                      np.asarray(p.tile_counts, dtype=np.int32), deltas))
        return out


# ---------------------------------------------------------------------------------------------
# From a recipe
# ---------------------------------------------------------------------------------------------
def build_index(recipe: "Recipe") -> MixedIndex:
    d = recipe.data
    if d.meta_path:
        datasets = load_meta(d.meta_path)
    else:
        from v2pe_megatron.data.synthetic import synth_records, synthetic_image_sides

        min_side, max_side = synthetic_image_sides(recipe.model.vision.image_size)
        records, images = synth_records(d.synthetic_num_samples, d.seed, min_side=min_side,
                                        max_side=max_side, haystack_words=40, max_images=2)
        datasets = [MemoryDataset(records, images, name="synthetic")]
    return MixedIndex(datasets, d.seed)


def settings_from_recipe(recipe: "Recipe", *, pad_multiple: int | None = None) -> LoaderSettings:
    """``pad_multiple`` defaults to the recipe layout's seq_multiple (2*cp, x tp under sequence
    parallel), so that context parallelism can cut every sub-sample."""
    if pad_multiple is None:
        from v2pe_megatron.parallel.layout import Layout

        pad_multiple = Layout.from_config(recipe.parallel).seq_multiple
    return LoaderSettings(recipe.data, image_size=recipe.model.vision.image_size,
                          num_image_token=recipe.model.num_image_token, pad_multiple=pad_multiple)


def build_train_loader(recipe: "Recipe", *, dp_rank: int, dp_size: int, tokenizer: Tokenizer | None = None,
                       max_epochs: int | None = None, prefetch: int = 2,
                       pad_multiple: int | None = None, cp_rank: int = 0, cp_size: int = 1,
                       record_skips: bool = False) -> TrainLoader:
    """This rank's micro-batch iterator for ``recipe`` (synthetic in-memory data when
    ``data.meta_path`` is empty); with ``cp_size`` > 1, holding only CP rank ``cp_rank``'s tiles."""
    from v2pe_megatron.v2pe import make_delta_policy

    tok = tokenizer or build_tokenizer(recipe.data.tokenizer_path)
    check_tokenizer(recipe, tok)
    return TrainLoader(build_index(recipe), tok, settings_from_recipe(recipe, pad_multiple=pad_multiple),
                       make_delta_policy(recipe.v2pe), dp_rank=dp_rank, dp_size=dp_size, max_epochs=max_epochs,
                       prefetch=prefetch, cp_rank=cp_rank, cp_size=cp_size, record_skips=record_skips)
