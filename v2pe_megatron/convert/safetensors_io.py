"""Sharded safetensors, one tensor at a time in both directions.

:class:`SafetensorsReader` opens the shards of a checkpoint (``model.safetensors`` or the ones its
``model.safetensors.index.json`` lists) and reads a tensor only when asked; :class:`ShardWriter`
collects tensors up to a shard size, writes each full shard and finally the index. safetensors holds
no code, so nothing foreign is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import Tensor

from v2pe_megatron.convert.errors import HFCheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# transformers writes InternVLForConditionalGeneration with the pre-v5 key layout (``vision_tower.*``,
# ``language_model.model.*``, ``language_model.lm_head``); its runtime names (and our table) are
# ``model.vision_tower.*``, ``model.language_model.*``, ``lm_head``.
_NATIVE_SAVED_PREFIXES = (("vision_tower.", "model.vision_tower."),
                          ("multi_modal_projector.", "model.multi_modal_projector."),
                          ("language_model.model.", "model.language_model."),
                          ("language_model.lm_head.", "lm_head."))


def canonical_native_name(k: str) -> str:
    for old, new in _NATIVE_SAVED_PREFIXES:
        if k.startswith(old):
            return new + k[len(old):]
    return k


def canonical_native_names(hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """Native-layout tensors under the runtime names, whichever of the two key layouts was saved."""
    out = {}
    for k, t in hf.items():
        k = canonical_native_name(k)
        if k in out:
            raise HFCheckpointError(f"HF tensor {k} appears under both key layouts")
        out[k] = t
    return out


def shard_files(hf_dir: str | os.PathLike) -> dict[str, str]:
    """tensor name -> shard file, from the index (or the one ``model.safetensors``)."""
    d = Path(hf_dir)
    if (d / INDEX).is_file():
        try:
            where = json.loads((d / INDEX).read_text())["weight_map"]
            if not isinstance(where, dict) or not all(isinstance(v, str) for v in where.values()):
                raise TypeError
        except (ValueError, KeyError, TypeError) as e:
            raise HFCheckpointError(f"{d / INDEX} is damaged (no readable weight_map: {type(e).__name__}); "
                                    f"restore it from the model's source") from None
        for f in sorted(set(where.values())):
            if not (d / f).is_file():
                raise HFCheckpointError(f"{d}: shard {f} named in {INDEX} is missing")
        return dict(where)
    if (d / SINGLE).is_file():
        return {k: SINGLE for k in read_header(d / SINGLE)[0]}
    raise HFCheckpointError(f"{d}: no {SINGLE} or {INDEX}; only safetensors checkpoints are read "
                            f"(convert .bin files with transformers' save_pretrained(safe_serialization=True))")


# safetensors' dtype names (little-endian, as the format stores them and as x86/ARM hosts hold them)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


# safetensors' own bound on the header (``MAX_HEADER_SIZE`` in its Rust reader)
MAX_HEADER_BYTES = 100_000_000


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], int]:
    """A safetensors file's tensors (name -> dtype, shape, data_offsets) and where its data starts,
    checked against the file's size, so that a damaged, truncated or foreign file is named, with
    what is wrong, before any tensor is read (``__metadata__`` is left out)."""
    path = Path(path)
    size = path.stat().st_size
    bad = f"{path} is not a readable safetensors file"
    fix = "replace it with the original (download it again)"
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > min(size - 8, MAX_HEADER_BYTES):
            raise HFCheckpointError(f"{bad}: its first 8 bytes give a header of {n} bytes in a file of {size} "
                                    f"bytes (damaged, truncated or not safetensors); {fix}")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise HFCheckpointError(f"{bad}: its header is not a JSON object (damaged or not safetensors); {fix}")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for k, meta in header.items():
        try:
            dtype, shape, (a, b) = meta["dtype"], [int(x) for x in meta["shape"]], map(int, meta["data_offsets"])
            ok = isinstance(dtype, str) and min(shape, default=0) >= 0 and 0 <= a <= b
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise HFCheckpointError(f"{bad}: the header entry of tensor {k} is malformed ({meta!r:.120}); {fix}")
        if b > data:
            raise HFCheckpointError(f"{path} is truncated: tensor {k} ends at data byte {b}, the file holds "
                                    f"{data} data bytes; {fix}")
        known = _DTYPES.get(dtype)
        if known is not None and b - a != math.prod(shape) * torch.empty((), dtype=known).element_size():
            raise HFCheckpointError(f"{bad}: tensor {k} ({dtype} {shape}) has {b - a} bytes of data; {fix}")
    return header, 8 + n


class SafetensorsReader:
    """Lazy access to a checkpoint's tensors. ``native=True`` exposes the runtime (``model.*``) names."""

    def __init__(self, hf_dir: str | os.PathLike, *, native: bool = False):
        self.dir = Path(hf_dir)
        self._where: dict[str, tuple[str, str]] = {}
        self._open: dict[str, dict] = {}
        self._data_start: dict[str, int] = {}
        # every shard's header now (they are small): a damaged shard or an index that names a tensor
        # its shard lacks is an error here, naming the file, before any work starts
        for k, f in shard_files(hf_dir).items():
            if k not in self._header(f):
                raise HFCheckpointError(f"{self.dir / f} has no tensor {k}, which {INDEX} places there: the index "
                                        f"and the shards do not belong together; replace them with the originals")
            name = canonical_native_name(k) if native else k
            if name in self._where:
                raise HFCheckpointError(f"HF tensor {name} appears under both key layouts")
            self._where[name] = (f, k)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _header(self, f: str) -> dict:
        """A shard's header (names, dtypes, shapes), read and checked once without mapping the data."""
        if f not in self._open:
            self._open[f], self._data_start[f] = read_header(self.dir / f)
        return self._open[f]

    def file_of(self, name: str) -> Path:
        return self.dir / self._where[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        f, k = self._where[name]
        return tuple(self._header(f)[k]["shape"])

    def nbytes(self, name: str) -> int:
        f, k = self._where[name]
        a, b = self._header(f)[k]["data_offsets"]
        return int(b) - int(a)

    def dtype(self, name: str) -> str:
        f, k = self._where[name]
        return self._header(f)[k]["dtype"]

    def get(self, name: str) -> Tensor:
        """A copy of one tensor, read with plain file reads into memory the tensor owns. Not mapped:
        the pages of a mapped shard count in this process's resident set for as long as any tensor
        from it lives (a zero-copy tensor keeps the mapping), and a freshly written shard's pages
        were seen to inflate the import's peak by 1.5 GB (benchmarks/RESULTS.md)."""
        f, k = self._where[name]
        meta = self._header(f)[k]
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:  # a dtype we do not spell: safetensors' own reader
            from safetensors import safe_open

            with safe_open(str(self.dir / f), framework="pt") as h:
                return h.get_tensor(k).clone()
        start, end = meta["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        with open(self.dir / f, "rb", buffering=0) as fh:
            fh.seek(self._data_start[f] + start)
            while done < len(view):
                got = fh.readinto(view[done:])
                if not got:
                    raise HFCheckpointError(f"{self.dir / f}: truncated while reading {k}")
                done += got
        return buf.view(dtype).reshape(meta["shape"])

    def close(self) -> None:
        self._open.clear()


def read_safetensors(hf_dir: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors at once (small checkpoints and tests; the converter streams with the reader)."""
    r = SafetensorsReader(hf_dir)
    return {k: r.get(k) for k in r.keys()}


class ShardWriter:
    """Writes tensors in the order given into ``model-0000i-of-0000N.safetensors`` shards of at most
    ``max_shard_bytes`` (a bigger tensor gets a shard of its own) plus the index; holds one shard."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 2 << 30):
        self.dir = Path(out_dir)
        self.max = int(max_shard_bytes)
        self._buf: dict[str, Tensor] = {}
        self._bytes = 0
        self._parts: list[list[str]] = []
        self.total_size = 0

    def add(self, name: str, t: Tensor) -> None:
        if name in self._buf or any(name in p for p in self._parts):
            raise HFCheckpointError(f"HF tensor {name} written twice")
        n = t.numel() * t.element_size()
        if self._buf and self._bytes + n > self.max:
            self._flush()
        self._buf[name] = t.detach().contiguous()
        self._bytes += n
        self.total_size += n

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buf:
            return
        path = self.dir / f"part-{len(self._parts):05d}.safetensors"
        try:
            save_file(self._buf, str(path), metadata={"format": "pt"})
        except Exception as e:
            # safetensors reports a failed write as SafetensorError("... I/O error: ... (os error N)"):
            # the OSError it is, so that a full disk is named as such
            m = re.search(r"\(os error (\d+)\)", str(e))
            if m is None:
                raise
            raise OSError(int(m.group(1)), os.strerror(int(m.group(1))), str(path)) from e
        self._parts.append(list(self._buf))
        self._buf, self._bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, name the shards ``-of-N`` and write the index; returns the shard file names."""
        self._flush()
        n = len(self._parts)
        names = []
        weight_map = {}
        for i, keys in enumerate(self._parts):
            name = SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.dir / f"part-{i:05d}.safetensors").rename(self.dir / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        if n > 1:
            (self.dir / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total_size},
                                                      "weight_map": weight_map}, indent=2))
        return names


def uniform_dtype(dtypes: Iterable[str]) -> Optional[str]:
    """The recipe dtype of a checkpoint whose floating tensors all share one of fp32/bf16/fp16."""
    names = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}
    found = {names.get(d, d) for d in dtypes}
    return found.pop() if len(found) == 1 and next(iter(found)) in names.values() else None
