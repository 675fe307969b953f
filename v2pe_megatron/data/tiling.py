"""Dynamic tiling (docs/internvl.md) as one DALI pipeline, plus the Pillow reference.

The grid rule is InternVL's ``dynamic_preprocess``: candidate grids (cols, rows) with
min <= cols*rows <= max, ordered by tile count; the grid whose aspect ratio is closest to the image's
wins, and on an exact tie a later candidate replaces the current one when the image area exceeds half
of that candidate's pixel area. Within one tile count InternVL's candidate order is the iteration
order of a Python ``set`` of tuples (deterministic in CPython, not lexicographic), and that order
decides ties such as 2x1 vs 1x2 for an aspect ratio of 1.25, so the candidates are built the same way.

DALI does the whole tiling of a batch in one pass: decode, one bicubic resize to
(rows*S, cols*S), reshape [R, S, C, S, 3] -> transpose -> [R*C, S, S, 3] (row-major tiles), the
thumbnail (a resize of the whole image to S x S) concatenated after them, and normalisation with the
FHWC -> FCHW transpose fused into ``crop_mirror_normalize``. The thumbnail is resized only for
multi-tile images (a per-sample DALI conditional): for a 1x1 grid it would repeat the grid resize and
be dropped, which was up to half the work of such an image; with ``use_thumbnail=False`` the graph has
no thumbnail at all. ``antialias=True`` costs nothing when magnifying (DALI 2.4 CPU, measured), so
there is no separate magnify-only path.

Where nvidia-dali is not installed (it is a 400 MB wheel that not every machine carries),
:func:`make_tiler` returns a :class:`PillowTiler`: the same call on the Pillow reference, slower.

Pillow fallback per image. InternVL opens every image with ``Image.open(...).convert("RGB")``, so an
image Pillow opens is a valid training image even where DALI cannot decode it. Two kinds go to
Pillow (:func:`pillow_tiles`, the same grid and resize rule) instead of being skipped:

- decided from the header, before DALI runs: formats DALI's decoder (nvImageCodec) does not read
  (GIF, animated or not, ICO, TGA, PCX, ...: :data:`DALI_FORMATS` lists those it reads), and 16/32-bit
  integer and float pixels (Pillow modes ``I``, ``I;16*``, ``F``), which DALI decodes but rescales to
  8 bits where Pillow's ``convert("RGB")`` clips at 255: the tiles would differ from InternVL's;
- decided by DALI: an image whose decode fails (the batch is retried one image at a time to find it).

The caller learns which images took the fallback, and why (``fallbacks`` argument), to count them;
only an image that Pillow cannot open either is an :class:`ImageDecodeError`, whose message keeps
DALI's own reason (the line after "encountered:" in its error) next to Pillow's.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

log = logging.getLogger("v2pe_megatron.data")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageDecodeError(ValueError):
    """An image that cannot be decoded (corrupt, truncated, not an image)."""


# ---------------------------------------------------------------------------------------------
# Grid rule
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """(cols, rows) candidates in InternVL's order (see module docstring for why a set)."""
    cands = {(c, r) for n in range(min_num, max_num + 1) for c in range(1, n + 1) for r in range(1, n + 1)
             if min_num <= c * r <= max_num}
    return tuple(sorted(cands, key=lambda g: g[0] * g[1]))


def choose_grid(width: int, height: int, *, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    """(cols, rows) of the tiling for a ``width`` x ``height`` image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def tiles_for(grid: tuple[int, int], use_thumbnail: bool) -> int:
    n = grid[0] * grid[1]
    return n + 1 if use_thumbnail and n > 1 else n


def sample_tiling(sizes: Sequence[tuple[int, int]], *, min_num: int, max_num: int, image_size: int,
                  use_thumbnail: bool) -> tuple[list[tuple[int, int]], list[int]]:
    """(grids, tile counts) of one sample's images (``sizes``: (width, height) each). InternVL shares
    the tile budget ``max_num`` among a sample's images."""
    if len(sizes) > 1:
        max_num = max(1, max_num // len(sizes))
    min_num = min(min_num, max_num)
    grids = [choose_grid(w, h, min_num=min_num, max_num=max_num, image_size=image_size) for w, h in sizes]
    return grids, [tiles_for(g, use_thumbnail) for g in grids]


# ---------------------------------------------------------------------------------------------
# Pillow reference (InternVL's own path: resize, per-tile crop, ToTensor + Normalize)
# ---------------------------------------------------------------------------------------------
def pillow_tiles(image, grid: tuple[int, int], image_size: int, use_thumbnail: bool) -> np.ndarray:
    """float32 [T, 3, S, S] the way InternVL builds them from a PIL image (torchvision's ToTensor and
    Normalize written in numpy: torchvision does not install next to this torch)."""
    from PIL import Image

    image = image.convert("RGB")
    cols, rows = grid
    resized = image.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    crops = []
    for i in range(cols * rows):
        x, y = (i % cols) * image_size, (i // cols) * image_size
        crops.append(resized.crop((x, y, x + image_size, y + image_size)))
    if use_thumbnail and len(crops) != 1:
        crops.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    out = [(np.asarray(c, np.float32).transpose(2, 0, 1) / 255.0 - mean) / std for c in crops]
    return np.stack(out).astype(np.float32)


_BYTESIO = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _pil_reason(err: BaseException) -> str:
    """Pillow's message without the ``<_io.BytesIO object at 0x...>`` it names the file by (the
    caller names the file)."""
    from PIL import UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):
        return "not an image format Pillow can identify"
    return _BYTESIO.sub("", str(err)).strip() or type(err).__name__


def allow_large_images() -> None:
    """Turn off Pillow's own decompression-bomb check (process-wide): the loader checks every header
    against ``data.max_image_pixels`` before anything is decoded, and that limit is the user's to
    set (Pillow's would otherwise raise out of the loader for any image above ~179 MP, or warn above
    ~89 MP, whatever the recipe says)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None


# Formats nvImageCodec decodes (on the CPU and the GPU), by the name Pillow gives them. PPM stands for
# the whole PNM family, MPO is a JPEG with extra pictures appended (both decoders take the first).
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "TIFF", "BMP", "PPM", "WEBP", "JPEG2000"})


def _deep_pixels(mode: str) -> bool:
    """More than 8 bits per channel in a mode ``convert("RGB")`` clips (DALI rescales instead)."""
    return mode in ("I", "F") or mode.startswith("I;16")


def pillow_only_reason(data: bytes | np.ndarray) -> str:
    """Why this image must be tiled by Pillow rather than DALI ("" when DALI gives InternVL's tiles);
    raises ImageDecodeError when Pillow cannot read the header (InternVL could not open it either)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format or "unknown", im.mode
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"unreadable image header: {_pil_reason(e)}") from e
    if fmt not in DALI_FORMATS:
        return f"DALI cannot decode {fmt}"
    if _deep_pixels(mode):
        return f"{fmt} with {mode} pixels (DALI would rescale what Pillow clips)"
    return ""


def pillow_decode(data: bytes | np.ndarray, grid: tuple[int, int], image_size: int,
                  use_thumbnail: bool) -> np.ndarray | ImageDecodeError:
    """:func:`pillow_tiles` of encoded bytes, or the error saying why Pillow cannot open them."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return pillow_tiles(im, grid, image_size, use_thumbnail)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        return ImageDecodeError(f"decode failed: {_pil_reason(err)}")


_DALI_NOISE = ("Critical error in pipeline", "Current pipeline object is no longer valid")


def dali_reason(err: BaseException) -> str:
    """The useful part of a DALI decode error: the lines after "encountered:" (the decoder's own
    reason), without the pipeline boilerplate DALI wraps it in."""
    text = str(err)
    head, sep, tail = text.partition("encountered:")
    lines = [ln.strip() for ln in (tail if sep else head).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(_DALI_NOISE)]
    return "; ".join(lines) or type(err).__name__


def image_size_of(data: bytes) -> tuple[int, int]:
    """(width, height) from the header only; raises ImageDecodeError for anything unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        raise ImageDecodeError(f"unreadable image header: {_pil_reason(e)}") from e
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"image has size {w}x{h}")
    return w, h


# ---------------------------------------------------------------------------------------------
# DALI pipeline
# ---------------------------------------------------------------------------------------------
def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency; be defensive anyway
        return False


class DaliTiler:
    """Decode + tile + normalise a batch of encoded images in one DALI pipeline.

    ``device``: "cpu" (CPU operators, ``device_id=None``), "gpu" (mixed decode, GPU resize) or
    "auto" (gpu when CUDA is there). A batch whose decode fails is retried one image at a time, so a
    corrupt file costs its own sample only: the result list holds an :class:`ImageDecodeError` there.
    """

    def __init__(self, image_size: int, *, use_thumbnail: bool = True, num_threads: int = 1,
                 max_batch: int = 16, device: str = "cpu") -> None:
        if device == "auto":
            device = "gpu" if cuda_available() else "cpu"
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be cpu, gpu or auto, got {device!r}")
        self.image_size = image_size
        self.use_thumbnail = use_thumbnail
        self.num_threads = max(1, num_threads)
        self.max_batch = max(1, max_batch)
        self.device = device
        self.device_id: int | None = None
        if device == "gpu":
            import torch

            # This rank's GPU, read now: the current CUDA device is per thread, and the pipeline is
            # built later in the loader's prefetch thread.
            self.device_id = torch.cuda.current_device()
        self._pipe = None
        # DALI pipelines are not re-entrant; the loader's prefetch thread and a caller may share one.
        self._lock = threading.Lock()

    def _build(self):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        s = self.image_size
        gpu = self.device == "gpu"
        device_id = self.device_id

        use_thumbnail = self.use_thumbnail
        norm = dict(dtype=types.FLOAT, output_layout="FCHW",
                    mean=[m * 255.0 for m in IMAGENET_MEAN], std=[v * 255.0 for v in IMAGENET_STD])

        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads,
                      device_id=device_id, prefetch_queue_depth=1, exec_dynamic=True,
                      enable_conditionals=use_thumbnail)
        def tiling():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            hw = fn.external_source(name="hw", dtype=types.FLOAT, ndim=1)
            shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)
            # InternVL opens with Pillow, which ignores EXIF orientation: so must we.
            img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                    adjust_orientation=False)
            # size is (H, W); cubic + antialias is Pillow's BICUBIC (a support-scaled filter).
            big = fn.resize(img, size=hw, interp_type=types.INTERP_CUBIC, antialias=True)
            tiles = fn.reshape(big, shape=shape)
            tiles = fn.transpose(tiles, perm=[0, 2, 1, 3, 4])
            tiles = fn.reshape(tiles, shape=[-1, s, s, 3], layout="FHWC")
            if not use_thumbnail:
                return fn.crop_mirror_normalize(tiles, **norm)
            multi = fn.external_source(name="multi", dtype=types.BOOL, ndim=0)
            if multi:
                thumb = fn.resize(img, size=[s, s], interp_type=types.INTERP_CUBIC, antialias=True)
                thumb = fn.reshape(thumb, shape=[1, s, s, 3], layout="FHWC")
                tiles = fn.cat(tiles, thumb, axis=0)
            return fn.crop_mirror_normalize(tiles, **norm)

        pipe = tiling()
        pipe.build()
        return pipe

    def _run(self, encoded: Sequence[np.ndarray], grids: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        if self._pipe is None:
            self._pipe = self._build()
        s = self.image_size
        self._pipe.feed_input("enc", list(encoded))
        self._pipe.feed_input("hw", [np.array([r * s, c * s], np.float32) for c, r in grids])
        self._pipe.feed_input("shape", [np.array([r, s, c, s, 3], np.int32) for c, r in grids])
        if self.use_thumbnail:
            self._pipe.feed_input("multi", [np.array(c * r > 1) for c, r in grids])
        (out,) = self._pipe.run()
        if self.device == "gpu":
            out = out.as_cpu()
        # The dynamic executor hands its output buffers over (zero-copy, DALI >= 1.44): the numpy
        # views stay valid after later runs, so no copy of the float tiles is made here.
        return [np.asarray(out[i]) for i in range(len(grids))]

    def __call__(self, encoded: Sequence[bytes | np.ndarray], grids: Sequence[tuple[int, int]],
                 fallbacks: list[tuple[int, str]] | None = None) -> list[np.ndarray | ImageDecodeError]:
        """float32 [T, 3, S, S] per image (tiles row-major, then the thumbnail), or the error.

        Images DALI cannot decode as InternVL would are tiled by Pillow (module docstring); each one
        is appended to ``fallbacks``, when given, as (its index in ``encoded``, why)."""
        arrays = [np.frombuffer(e, np.uint8) if isinstance(e, (bytes, bytearray, memoryview)) else e
                  for e in encoded]
        results: list[np.ndarray | ImageDecodeError | None] = [None] * len(arrays)
        to_pillow: dict[int, str] = {}
        for i, a in enumerate(arrays):
            try:
                why = pillow_only_reason(a)
            except ImageDecodeError as e:
                results[i] = e
                continue
            if why:
                to_pillow[i] = why
        todo = [i for i, r in enumerate(results) if r is None and i not in to_pillow]
        failed: dict[int, str] = {}
        with self._lock:
            for lo in range(0, len(todo), self.max_batch):
                idx = todo[lo: lo + self.max_batch]
                chunk, g = [arrays[i] for i in idx], [grids[i] for i in idx]
                try:
                    for i, r in zip(idx, self._run(chunk, g)):
                        results[i] = r
                except RuntimeError:
                    # One bad image fails the whole batch; find it by decoding one at a time.
                    for i in idx:
                        try:
                            (results[i],) = self._run([arrays[i]], [grids[i]])
                        except RuntimeError as e:
                            failed[i] = f"DALI: {dali_reason(e)}"
        for i, why in sorted({**to_pillow, **failed}.items()):
            r = pillow_decode(arrays[i], grids[i], self.image_size, self.use_thumbnail)
            if isinstance(r, ImageDecodeError):
                r = ImageDecodeError(f"decode failed: {why}; Pillow: {str(r).removeprefix('decode failed: ')}"
                                     if i in failed else str(r))
            elif fallbacks is not None:
                fallbacks.append((i, why))
            results[i] = r
        return results  # type: ignore[return-value]  (every slot is filled)


# ---------------------------------------------------------------------------------------------
# Without DALI
# ---------------------------------------------------------------------------------------------
class PillowTiler:
    """:class:`DaliTiler`'s call on :func:`pillow_tiles`, one image at a time on the calling thread.

    ``num_threads``, ``max_batch`` and ``device`` are accepted so the two are interchangeable; the
    work is CPU only. Tiles agree with DALI's to within resampling rounding (tests/data/test_tiling.py).
    """

    def __init__(self, image_size: int, *, use_thumbnail: bool = True, num_threads: int = 1,
                 max_batch: int = 16, device: str = "cpu") -> None:
        self.image_size = image_size
        self.use_thumbnail = use_thumbnail
        self.device = "cpu"

    def __call__(self, encoded: Sequence[bytes | np.ndarray], grids: Sequence[tuple[int, int]],
                 fallbacks: list[tuple[int, str]] | None = None) -> list[np.ndarray | ImageDecodeError]:
        """``fallbacks`` stays empty: every image is Pillow's here (said once, by :func:`make_tiler`)."""
        return [pillow_decode(e, g, self.image_size, self.use_thumbnail) for e, g in zip(encoded, grids)]


_fallback_logged = False


def make_tiler(image_size: int, *, use_thumbnail: bool = True, num_threads: int = 1, max_batch: int = 16,
               device: str = "cpu") -> DaliTiler | PillowTiler:
    """A :class:`DaliTiler`, or a :class:`PillowTiler` when nvidia-dali cannot be imported."""
    global _fallback_logged
    try:
        import nvidia.dali  # noqa: F401  (DaliTiler only imports it at its first batch)
    except ImportError as e:
        if not _fallback_logged:
            _fallback_logged = True
            log.warning("nvidia-dali cannot be imported (%s): tiling images with Pillow on the CPU "
                        "(same tiles, slower; data.dali_device=%s not used)", e, device)
        return PillowTiler(image_size, use_thumbnail=use_thumbnail, num_threads=num_threads,
                           max_batch=max_batch, device=device)
    return DaliTiler(image_size, use_thumbnail=use_thumbnail, num_threads=num_threads, max_batch=max_batch,
                     device=device)
