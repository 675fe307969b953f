"""Dataset formats: InternVL meta files over jsonl annotations, webdataset tar shards, in-memory
records; weighted mixing by ``repeat_time``, seeded shuffling and data-parallel sharding.

Every format is random access (a line-offset index for jsonl, a member-offset index for tar shards),
so one sample order (a permutation of the mixed index per epoch, split across ranks) serves all of
them and a resumed run can jump straight to its position.

Meta file (InternVL / V2PE)::

    {"name": {"root": "images/", "annotation": "train.jsonl", "repeat_time": 1.0, "length": 1000,
              "max_dynamic_patch": 6, "data_augment": false}}

Relative ``root`` / ``annotation`` paths are resolved against the meta file's directory. An
``annotation`` ending in ``.tar`` (brace patterns such as ``shards/{000..009}.tar`` allowed) or
``"format": "webdataset"`` selects tar shards. ``data_augment`` is accepted and ignored (the
pipeline does no augmentation). ``length`` is informational; the real line count is used.
"""

from __future__ import annotations

import json
import mmap
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from v2pe_megatron.data.skips import SampleError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass
class ImageRef:
    """One image of a sample: where it is, and how to get its encoded bytes."""

    name: str
    load: Callable[[], bytes]


@dataclass
class RawSample:
    id: str
    conversations: list[dict[str, Any]] | None = None
    text: str | None = None
    images: list[ImageRef] = field(default_factory=list)


def parse_record(obj: Any, resolve_image: Callable[[str], ImageRef]) -> RawSample:
    """InternVL jsonl record -> RawSample. Raises SampleError for anything that is not a sample."""
    if not isinstance(obj, dict):
        raise SampleError("bad_json", f"expected a JSON object, got {type(obj).__name__}")
    sid = str(obj.get("id", ""))
    img = obj.get("image", obj.get("images"))
    if img is None:
        names: list[str] = []
    elif isinstance(img, str):
        names = [img]
    elif isinstance(img, list) and all(isinstance(x, str) for x in img):
        names = list(img)
    else:
        raise SampleError("bad_record", "'image' must be a path or a list of paths")
    convs = obj.get("conversations")
    text = obj.get("text")
    if convs is None and text is None:
        raise SampleError("empty_conversation", "no 'conversations' and no 'text'")
    if convs is not None:
        if not isinstance(convs, list):
            raise SampleError("bad_record", "'conversations' must be a list")
        for turn in convs:
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) \
                    or turn.get("from") not in ("human", "gpt", "system", "user", "assistant"):
                raise SampleError("bad_record", f"bad conversation turn {str(turn)[:80]!r}")
        return RawSample(sid, conversations=convs, images=[resolve_image(n) for n in names])
    if not isinstance(text, str):
        raise SampleError("bad_record", "'text' must be a string")
    return RawSample(sid, text=text, images=[resolve_image(n) for n in names])


def _file_image(root: Path) -> Callable[[str], ImageRef]:
    def resolve(name: str) -> ImageRef:
        path = root / name

        def load() -> bytes:
            try:
                return path.read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
                raise SampleError("missing_image", str(path)) from e

        return ImageRef(str(path), load)

    return resolve


def _decode_json_line(raw: bytes) -> Any:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleError("bad_utf8", str(e)) from e
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise SampleError("bad_json", str(e)) from e


def format_source(src: dict[str, Any]) -> str:
    """A :meth:`Dataset.source` as a person opens it: ``file:line``, ``shard.tar:key``, ``name[i]``."""
    if "file" in src:
        return f"{src['file']}:{src.get('line', src.get('key'))}"
    if "dataset" in src:
        return f"{src['dataset']}[{src['index']}]"
    return ", ".join(f"{k}={v}" for k, v in src.items())


class Dataset:
    """A random-access list of raw samples."""

    name: str = ""
    repeat_time: float = 1.0
    max_dynamic_patch: int | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> RawSample:
        raise NotImplementedError

    def source(self, i: int) -> dict[str, Any]:
        """Where sample ``i`` is, as fields: ``{"file", "line"}`` (jsonl), ``{"file", "key"}`` (a
        tar shard), ``{"dataset", "index"}`` (in memory)."""
        return {"dataset": self.name, "index": i}

    def locate(self, i: int) -> str:
        """Where sample ``i`` is, for a person to open: ``file:line``, ``shard.tar:key``, ..."""
        return format_source(self.source(i))


class JsonlDataset(Dataset):
    """InternVL annotation file: one JSON sample per line; blank lines do not count."""

    def __init__(self, annotation: str | Path, root: str | Path = "", *, name: str = "",
                 repeat_time: float = 1.0, max_dynamic_patch: int | None = None) -> None:
        self.path = Path(annotation)
        if not self.path.is_file():
            raise FileNotFoundError(f"annotation file not found: {self.path}")
        self.root = Path(root)
        self.name = name or self.path.stem
        self.repeat_time = float(repeat_time)
        self.max_dynamic_patch = max_dynamic_patch
        self._resolve = _file_image(self.root)
        self.starts, self.ends = self._index()
        self._fd: int | None = None

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        size = self.path.stat().st_size
        if size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = np.frombuffer(mm, dtype=np.uint8)
            nl = np.flatnonzero(buf == 10).astype(np.int64)
            del buf
        ends = np.append(nl, size) if (nl.size == 0 or nl[-1] != size - 1) else nl
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        # Blank lines (including a lone '\r') are not samples.
        keep = (ends - starts) > 1
        keep |= ((ends - starts) == 1) & (self._byte_at(starts) != 13)
        return starts[keep], ends[keep]

    def _byte_at(self, offsets: np.ndarray) -> np.ndarray:
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return np.frombuffer(mm, dtype=np.uint8)[np.minimum(offsets, len(mm) - 1)].copy()

    def __len__(self) -> int:
        return int(self.starts.size)

    def read(self, i: int) -> RawSample:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        start, end = int(self.starts[i]), int(self.ends[i])
        raw = os.pread(self._fd, end - start, start)
        return parse_record(_decode_json_line(raw), self._resolve)

    def source(self, i: int) -> dict[str, Any]:
        # Line numbers count every line (blank ones too), as an editor shows them; counted only
        # when a skip is reported, so the index keeps one offset per sample.
        start = int(self.starts[i])
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            line = int(np.count_nonzero(np.frombuffer(mm, dtype=np.uint8, count=start) == 10)) + 1
        return {"file": str(self.path), "line": line}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)  # type: ignore[arg-type]
            except OSError:
                pass


class TarDataset(Dataset):
    """webdataset shards: members ``<key>.json`` (the InternVL record) plus the images
    ``<key>.jpg`` / ``<key>.0.png`` ...; the record's ``image`` names the members by their suffix
    (``"jpg"``, ``["0.png", "1.png"]``); without it the key's image members are used in name
    order. A ``<key>.txt`` member alone is a plain-text sample."""

    def __init__(self, shards: Sequence[str | Path], *, name: str = "", repeat_time: float = 1.0,
                 max_dynamic_patch: int | None = None) -> None:
        self.shards = [Path(s) for s in shards]
        for s in self.shards:
            if not s.is_file():
                raise FileNotFoundError(f"webdataset shard not found: {s}")
        self.name = name or self.shards[0].stem
        self.repeat_time = float(repeat_time)
        self.max_dynamic_patch = max_dynamic_patch
        self.samples: list[tuple[str, dict[str, tuple[int, int, int]]]] = []
        for si, shard in enumerate(self.shards):
            by_key: dict[str, dict[str, tuple[int, int, int]]] = {}
            with tarfile.open(shard, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    d, base = os.path.split(m.name)
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    by_key.setdefault(os.path.join(d, stem), {})[ext.lower()] = (si, m.offset_data, m.size)
            self.samples.extend(by_key.items())

    def __len__(self) -> int:
        return len(self.samples)

    def _member(self, loc: tuple[int, int, int]) -> bytes:
        si, off, size = loc
        with open(self.shards[si], "rb") as f:
            f.seek(off)
            return f.read(size)

    def source(self, i: int) -> dict[str, Any]:
        key, members = self.samples[i]
        return {"file": str(self.shards[next(iter(members.values()))[0]]), "key": key}

    def read(self, i: int) -> RawSample:
        key, members = self.samples[i]

        def resolve(suffix: str) -> ImageRef:
            loc = members.get(suffix.lower())

            def load() -> bytes:
                if loc is None:
                    raise SampleError("missing_image", f"{key}.{suffix} not in shard")
                return self._member(loc)

            return ImageRef(f"{key}.{suffix}", load)

        if "json" in members:
            obj = _decode_json_line(self._member(members["json"]))
            if isinstance(obj, dict) and "image" not in obj and "images" not in obj:
                imgs = sorted(e for e in members if e.rsplit(".", 1)[-1] in IMAGE_EXTS)
                if imgs:
                    obj = {**obj, "image": imgs}
            rec = parse_record(obj, resolve)
            rec.id = rec.id or key
            return rec
        if "txt" in members:
            try:
                text = self._member(members["txt"]).decode("utf-8")
            except UnicodeDecodeError as e:
                raise SampleError("bad_utf8", str(e)) from e
            return RawSample(key, text=text)
        raise SampleError("bad_record", f"sample {key} has neither .json nor .txt")


class MemoryDataset(Dataset):
    """Records held in memory (synthetic data); images are encoded bytes keyed by name."""

    def __init__(self, records: Sequence[dict[str, Any]], images: dict[str, bytes], *, name: str = "memory",
                 repeat_time: float = 1.0, max_dynamic_patch: int | None = None) -> None:
        self.records = list(records)
        self.images = images
        self.name = name
        self.repeat_time = float(repeat_time)
        self.max_dynamic_patch = max_dynamic_patch

    def __len__(self) -> int:
        return len(self.records)

    def read(self, i: int) -> RawSample:
        def resolve(n: str) -> ImageRef:
            def load() -> bytes:
                if n not in self.images:
                    raise SampleError("missing_image", n)
                return self.images[n]

            return ImageRef(n, load)

        return parse_record(self.records[i], resolve)


# ---------------------------------------------------------------------------------------------
# Meta files
# ---------------------------------------------------------------------------------------------
def _expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def load_meta(meta_path: str | Path) -> list[Dataset]:
    meta_path = Path(meta_path)
    if not meta_path.is_file():
        raise FileNotFoundError(f"data.meta_path: meta file not found: {meta_path}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path}: not a JSON meta file: {e}") from e
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{meta_path}: expected a JSON object name -> {{root, annotation, ...}}")
    base = meta_path.parent

    def rel(p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else base / q

    out: list[Dataset] = []
    for name, ent in meta.items():
        if not isinstance(ent, dict) or "annotation" not in ent:
            raise ValueError(f"{meta_path}: entry {name!r} needs at least an 'annotation' path")
        rt = float(ent.get("repeat_time", 1.0))
        if rt < 0:
            raise ValueError(f"{meta_path}: entry {name!r} has repeat_time {rt} < 0")
        mdp = ent.get("max_dynamic_patch")
        mdp = int(mdp) if mdp is not None else None
        ann = str(ent["annotation"])
        if ent.get("format") == "webdataset" or ann.endswith(".tar") or "{" in ann:
            out.append(TarDataset([rel(s) for s in _expand(ann)], name=name, repeat_time=rt, max_dynamic_patch=mdp))
        else:
            out.append(JsonlDataset(rel(ann), rel(str(ent.get("root", ""))), name=name, repeat_time=rt,
                                    max_dynamic_patch=mdp))
    return out


# ---------------------------------------------------------------------------------------------
# Mixing, shuffling, sharding
# ---------------------------------------------------------------------------------------------
class MixedIndex:
    """All datasets' samples, each repeated ``repeat_time`` times: whole copies for the integer part
    and a seeded subset for the fraction (InternVL takes ``int(n * r)`` samples when r < 1).

    Position in this index is a sample's stable global id (the V2PE delta draw's key)."""

    def __init__(self, datasets: Sequence[Dataset], seed: int) -> None:
        self.datasets = list(datasets)
        ds_parts, line_parts = [], []
        for d_idx, d in enumerate(self.datasets):
            n = len(d)
            whole, frac = int(d.repeat_time), d.repeat_time - int(d.repeat_time)
            lines = [np.arange(n, dtype=np.int64)] * whole
            k = int(n * frac)
            if k:
                rng = np.random.default_rng([seed, 7919, d_idx])
                lines.append(np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64))
            if lines:
                cat = np.concatenate(lines)
                line_parts.append(cat)
                ds_parts.append(np.full(cat.size, d_idx, dtype=np.int32))
        self.ds = np.concatenate(ds_parts) if ds_parts else np.zeros(0, np.int32)
        self.line = np.concatenate(line_parts) if line_parts else np.zeros(0, np.int64)
        self.seed = seed

    def __len__(self) -> int:
        return int(self.ds.size)

    def read(self, gid: int) -> tuple[Dataset, RawSample]:
        d = self.datasets[int(self.ds[gid])]
        return d, d.read(int(self.line[gid]))

    def locate(self, gid: int) -> str:
        return self.dataset_of(gid).locate(int(self.line[gid]))

    def source(self, gid: int) -> dict[str, Any]:
        return self.dataset_of(gid).source(int(self.line[gid]))

    def dataset_of(self, gid: int) -> Dataset:
        return self.datasets[int(self.ds[gid])]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global ids of ``epoch`` in training order: a seeded permutation, the same for every
        data-parallel size (the loader deals micro-batches, not samples, to ranks)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self))

    def rank_order(self, epoch: int, dp_rank: int, dp_size: int) -> np.ndarray:
        """``epoch_order`` dealt round-robin by sample, cut so that every rank has the same count (a
        sharding of samples; the training loader shards packed micro-batches instead)."""
        perm = self.epoch_order(epoch)
        per_rank = len(self) // dp_size
        return perm[: per_rank * dp_size][dp_rank::dp_size]
