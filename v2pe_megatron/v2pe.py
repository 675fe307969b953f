"""V2PE: variable visual position encoding (docs/v2pe.md).

Positions are computed on the host in float64 so that visual steps as small as 1/256 stay exact far
beyond the float32 limit (32,768); the rotary module turns them into angles in float64 too and only
casts the final, range-reduced angles.

Rule, per sample (positions restart at 0 for every sample / row):

- text tokens, ``<img>`` and ``</img>`` advance the position by 1;
- the k-th ``<IMG_CONTEXT>`` token of an image (k = 1..n) sits at ``pos(<img>) + delta * k``;
- ``</img>`` sits at ``ceil(pos(<img>) + delta * n) + 1`` and text continues +1 from there.

Every non-visual position is therefore an integer, and ``pos(<img>)`` is an exact integer. The
ceiling is taken on ``delta * n`` alone (``pos(<img>)`` being integral), with a snap: a product within
``1e-9`` of an integer counts as that integer, so that e.g. ``0.7 * 10 = 7.000000000000001`` does not
round up to 8. Deltas of the form 1/2^k are exact in binary and never need the snap.

No Python loop runs over tokens or images: positions are affine per segment (text run / visual
run), the segment table is built from the ``<img>``/``</img>`` indices, and one pass over the tokens
(in cache-sized chunks) checks the context-token layout and writes ``A + B * (i - O)``. A visual
position is ``pos(<img>) + delta * k`` evaluated as written (one product, one sum in float64), i.e.
exact for dyadic deltas. About 3 ms for a 1,048,576-token sample with 4,000 images on one core
(``benchmarks/v2pe_positions.py``).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from v2pe_megatron.config import V2PEConfig

__all__ = [
    "compute_position_ids",
    "DeltaPolicy",
    "DefaultDeltaPolicy",
    "FixedDeltaPolicy",
    "RandomDeltaPolicy",
    "make_delta_policy",
    "V2PERotaryEmbedding",
    "apply_rotary",
    "last_position",
    "DeltaChoice",
    "choose_inference_delta",
]

DeltaSpec = Union[float, Sequence[float], Sequence[Sequence[float]], np.ndarray]

# Products delta * n within this distance of an integer are taken as that integer before the ceiling.
_CEIL_SNAP = 1e-9
# Tokens per chunk of the position pass (temporaries of a few hundred KiB stay in cache).
_CHUNK = 1 << 15


def _as_numpy_ids(input_ids: Any) -> np.ndarray:
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.detach().cpu().numpy()
    arr = np.asarray(input_ids)
    if arr.ndim not in (1, 2):
        raise ValueError(f"input_ids must be 1-D [S] or 2-D [B, S], got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"input_ids must hold integers, got dtype {arr.dtype}")
    return arr


def _ceil_snapped(x: np.ndarray) -> np.ndarray:
    nearest = np.rint(x)
    return np.where(np.abs(x - nearest) <= _CEIL_SNAP, nearest, np.ceil(x)).astype(np.int64)


def _where(b: int, i: int, batched: bool) -> str:
    return f"row {b}, index {i}" if batched else f"index {i}"


def _deltas_per_image(delta: DeltaSpec, num_images: int, images_per_row: np.ndarray) -> np.ndarray:
    """One float64 delta per image, in row-major image order."""
    if np.isscalar(delta) or (isinstance(delta, np.ndarray) and delta.ndim == 0):
        out = np.full(num_images, float(delta), dtype=np.float64)  # type: ignore[arg-type]
        values = np.asarray([float(delta)])  # type: ignore[arg-type]
    else:
        seq = list(delta)  # type: ignore[arg-type]
        nested = len(seq) > 0 and all(not np.isscalar(x) and np.ndim(x) == 1 for x in seq)
        if nested:
            if len(seq) != len(images_per_row):
                raise ValueError(f"delta was given per row ({len(seq)} rows) but input_ids has "
                                 f"{len(images_per_row)} rows")
            for b, (row, n) in enumerate(zip(seq, images_per_row)):
                if len(row) != n:
                    raise ValueError(f"row {b} has {n} image(s) but {len(row)} delta(s) were given for it")
            out = (np.concatenate([np.asarray(r, dtype=np.float64) for r in seq])
                   if num_images else np.zeros(0, dtype=np.float64))
        else:
            out = np.asarray(seq, dtype=np.float64)
            if out.ndim != 1:
                raise ValueError(f"delta must be a float, one float per image, or one sequence per row; "
                                 f"got an array of shape {out.shape}")
            if out.shape[0] != num_images:
                raise ValueError(f"{out.shape[0]} delta(s) given for {num_images} image(s); give one float "
                                 f"for all images or exactly one per image, in order")
        values = out
    bad = values[~((values > 0.0) & (values <= 1.0))]  # also catches NaN
    if bad.size:
        raise ValueError(f"delta must be in (0, 1], got {float(bad[0])}")
    return out


def _diagnose_markup(ids: np.ndarray, img_start_id: int, img_end_id: int, img_context_id: int,
                     batched: bool) -> None:
    """Slow path, run only when the fast checks failed: find the first fault and say where it is."""
    is_start, is_end, is_ctx = ids == img_start_id, ids == img_end_id, ids == img_context_id
    # Inclusive depth: 1 on <img> and the tokens inside, 0 on </img> and outside.
    depth = np.cumsum(is_start, axis=1, dtype=np.int64) - np.cumsum(is_end, axis=1, dtype=np.int64)
    if depth.min() < 0:
        b, i = np.argwhere(depth < 0)[0]
        raise ValueError(f"unbalanced image markup: </img> at {_where(b, i, batched)} has no matching <img>")
    if depth.max() > 1:
        b, i = np.argwhere(depth > 1)[0]
        raise ValueError(f"nested <img> at {_where(b, i, batched)}: the previous image is not closed with </img>")
    if depth[:, -1].any():
        b = int(np.argmax(depth[:, -1] != 0))
        i = int(np.flatnonzero(is_start[b])[-1])
        raise ValueError(f"unbalanced image markup: <img> at {_where(b, i, batched)} is never closed with </img>")
    inside = (depth == 1) & ~is_start
    stray = is_ctx & ~inside
    if stray.any():
        b, i = np.argwhere(stray)[0]
        raise ValueError(f"<IMG_CONTEXT> token at {_where(b, i, batched)} is outside any <img> ... </img> block")
    foreign = inside & ~is_ctx
    if foreign.any():
        b, i = np.argwhere(foreign)[0]
        raise ValueError(f"token id {int(ids[b, i])} at {_where(b, i, batched)} lies inside an image; only "
                         f"<IMG_CONTEXT> ({img_context_id}) may appear between <img> and </img>")
    raise AssertionError("image markup check failed without a diagnosis")  # unreachable


def compute_position_ids(input_ids: Any, *, img_start_id: int, img_end_id: int, img_context_id: int,
                         delta: DeltaSpec) -> np.ndarray:
    """V2PE position ids (float64, same shape as ``input_ids``: [S] or [B, S]).

    ``input_ids``: numpy array or torch tensor of token ids. Each row of a 2-D input is an
    independent sample whose positions start at 0 (pass packed sub-samples as separate calls or rows:
    positions restart per sub-sample, as in the model's training data).

    ``delta``: one float for every image; or a flat sequence with one value per image, images taken
    in row-major order (row 0's images left to right, then row 1's, ...); or, for 2-D input, a
    sequence of B per-row sequences (each may be empty). Every value must lie in (0, 1].

    Raises ValueError for malformed image markup: ``</img>`` without ``<img>``, nested or unclosed
    ``<img>``, ``<IMG_CONTEXT>`` outside an image, any other token between ``<img>`` and ``</img>``,
    or a wrong number of deltas.
    """
    arr = _as_numpy_ids(input_ids)
    batched = arr.ndim == 2
    ids = arr if batched else arr[None, :]
    num_rows, seq_len = ids.shape
    total = ids.size

    flat = ids.reshape(-1)
    # Row-major flat indices; well-formed markup alternates <img> < </img> < <img> ... in each row,
    # which these O(num_images) checks establish; the context-token layout is checked per chunk below.
    mask = np.empty(total, dtype=bool)  # one scratch mask: fresh pages cost more than the compares
    starts = np.flatnonzero(np.equal(flat, img_start_id, out=mask))
    ends = np.flatnonzero(np.equal(flat, img_end_id, out=mask))
    ok = starts.size == ends.size
    if ok and starts.size:
        ok = bool((ends > starts).all() and (starts[1:] > ends[:-1]).all()
                  and (starts // seq_len == ends // seq_len).all())
    elif ok:
        ok = not np.equal(flat, img_context_id, out=mask).any()
    if not ok:
        _diagnose_markup(ids, img_start_id, img_end_id, img_context_id, batched)
    num_images = starts.size
    n_visual = ends - starts - 1
    row = starts // seq_len
    deltas = _deltas_per_image(delta, num_images, np.bincount(row, minlength=num_rows))

    if num_images == 0:
        pos = np.broadcast_to(np.arange(seq_len, dtype=np.float64), ids.shape).copy()
        return pos if batched else pos[0]

    # Positions are affine on segments: pos = A + B * (i - O). Segments, in token order: each row's
    # leading text (from the row start, through the first <img>), then per image its visual run
    # (B = delta, O = <img>, A = pos(<img>)) and the text after it (from </img>, B = 1).
    # An image saves n - ceil(delta * n) positions compared with plain arange, cumulated per row.
    row_start = row * seq_len
    saved = n_visual - _ceil_snapped(deltas * n_visual)
    saved_incl = np.cumsum(saved)
    first_of_row = np.searchsorted(row, row, side="left")  # index of the row's first image
    saved_incl -= (saved_incl - saved)[first_of_row]  # restart the running total in every row
    img_pos = (starts - row_start) - (saved_incl - saved)
    end_pos = (ends - row_start) - saved_incl

    rows = np.arange(num_rows, dtype=np.int64) * seq_len
    seg_first = np.concatenate([rows, starts + 1, ends])
    # A stable sort puts an empty visual run (first == </img>) before the text that follows it.
    order = np.argsort(seg_first, kind="stable")
    seg_first = seg_first[order]
    seg_end = np.append(seg_first[1:], total)
    seg_visual = np.concatenate([np.zeros(num_rows, dtype=bool), np.ones(num_images, dtype=bool),
                                 np.zeros(num_images, dtype=bool)])[order]
    seg_origin = np.concatenate([rows, starts, ends])[order]
    seg_a = np.concatenate([np.zeros(num_rows, dtype=np.int64), img_pos, end_pos])[order].astype(np.float64)
    seg_b = np.concatenate([np.ones(num_rows), deltas, np.ones(num_images)])[order]

    # Cache-sized chunks keep the temporaries in cache and off fresh pages; only `pos` is new memory.
    pos = np.empty(total, dtype=np.float64)
    for lo in range(0, total, _CHUNK):
        hi = min(total, lo + _CHUNK)
        s0 = int(np.searchsorted(seg_first, lo, side="right")) - 1
        s1 = int(np.searchsorted(seg_first, hi, side="left"))
        lens = np.minimum(seg_end[s0:s1], hi) - np.maximum(seg_first[s0:s1], lo)
        ctx = np.equal(flat[lo:hi], img_context_id, out=mask[lo:hi])
        if not np.array_equal(np.repeat(seg_visual[s0:s1], lens), ctx):
            _diagnose_markup(ids, img_start_id, img_end_id, img_context_id, batched)
        out = pos[lo:hi]
        np.subtract(np.arange(lo, hi, dtype=np.int64), np.repeat(seg_origin[s0:s1], lens), out=out,
                    casting="unsafe")  # exact: integers far below 2^53
        out *= np.repeat(seg_b[s0:s1], lens)
        out += np.repeat(seg_a[s0:s1], lens)
    pos = pos.reshape(ids.shape)
    return pos if batched else pos[0]


# ---------------------------------------------------------------------------------------------
# Choosing the inference delta
# ---------------------------------------------------------------------------------------------
def last_position(num_nonvisual_tokens: int, image_tokens: Sequence[int], delta: float) -> float:
    """The position of a sample's last token under :func:`compute_position_ids` with one ``delta``
    for every image, from counts alone: ``num_nonvisual_tokens`` counts every token that is not
    ``<IMG_CONTEXT>`` (text, ``<img>``, ``</img>``), ``image_tokens`` the ``<IMG_CONTEXT>`` tokens of
    each image. Each image adds ``ceil(delta * n)`` positions (the rule in the module docstring)."""
    if num_nonvisual_tokens < 1:
        raise ValueError(f"num_nonvisual_tokens must be >= 1 (the sample's last token), got {num_nonvisual_tokens}")
    if not 0.0 < delta <= 1.0:
        raise ValueError(f"delta must be in (0, 1], got {delta}")
    n = np.asarray(list(image_tokens), dtype=np.int64)
    if (n < 0).any():
        raise ValueError(f"image token counts must be >= 0, got {n.tolist()}")
    return float(num_nonvisual_tokens - 1 + int(_ceil_snapped(delta * n).sum()))


@dataclass(frozen=True)
class DeltaChoice:
    delta: float            # the chosen inference delta
    last_position: float    # the sample's last position at that delta
    trained_positions: int  # the position range the model was trained on
    fits: bool              # last_position < trained_positions (False: even the smallest delta overflows)


def choose_inference_delta(num_nonvisual_tokens: int, image_tokens: Sequence[int], trained_positions: int,
                           delta_set: Sequence[float]) -> DeltaChoice:
    """The largest delta of ``delta_set`` whose positions for this context stay inside the trained
    range (last position < ``trained_positions``): visual tokens are compressed only as much as the
    context needs, so short contexts keep delta = 1 (the fine-tuned model's native resolution) and
    long ones drop to 1/16, 1/64, ... When no delta fits (the text alone overflows the range), the
    smallest delta, with ``fits=False``: positions beyond the trained range are then unavoidable.
    ``v2pe-eval --delta auto`` applies it per sample; ``v2pe-convert export-hf --v2pe-delta`` takes
    its result. docs/eval.md explains the choice."""
    if trained_positions < 1:
        raise ValueError(f"trained_positions must be >= 1, got {trained_positions}")
    values = sorted({float(d) for d in delta_set}, reverse=True)
    if not values or any(not 0.0 < d <= 1.0 for d in values):
        raise ValueError(f"delta_set must be a non-empty list of values in (0, 1], got {list(delta_set)}")
    for d in values:
        last = last_position(num_nonvisual_tokens, image_tokens, d)
        if last < trained_positions:
            return DeltaChoice(d, last, int(trained_positions), True)
    return DeltaChoice(values[-1], last_position(num_nonvisual_tokens, image_tokens, values[-1]),
                       int(trained_positions), False)


# ---------------------------------------------------------------------------------------------
# Delta policies
# ---------------------------------------------------------------------------------------------
class DeltaPolicy(abc.ABC):
    """Picks one delta per image of a sample."""

    @abc.abstractmethod
    def deltas(self, num_images: int, sample_key: int) -> np.ndarray:
        """float64 array with one delta per image, in image order."""

    @staticmethod
    def _check(num_images: int) -> None:
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")


class DefaultDeltaPolicy(DeltaPolicy):
    """delta = 1: plain integer positions, identical to ``arange``."""

    def deltas(self, num_images: int, sample_key: int) -> np.ndarray:
        self._check(num_images)
        return np.ones(num_images, dtype=np.float64)

    def __repr__(self) -> str:
        return "DefaultDeltaPolicy()"


class FixedDeltaPolicy(DeltaPolicy):
    """One fixed delta for every image (the reference's ``v2pe_fix``; inference)."""

    def __init__(self, delta: float) -> None:
        if not 0.0 < delta <= 1.0:
            raise ValueError(f"v2pe delta must be in (0, 1], got {delta}")
        self.delta = float(delta)

    def deltas(self, num_images: int, sample_key: int) -> np.ndarray:
        self._check(num_images)
        return np.full(num_images, self.delta, dtype=np.float64)

    def __repr__(self) -> str:
        return f"FixedDeltaPolicy(delta={self.delta})"


class RandomDeltaPolicy(DeltaPolicy):
    """Per image, independently and uniformly, one value of ``delta_set`` (the reference's
    ``v2pe_rnd``). The generator is seeded from ``(seed, sample_key)`` only, so the draw for a sample
    does not depend on which samples were drawn before it: a resumed run, or a run that visits
    samples in another order or on other workers, gets the same deltas for the same sample."""

    def __init__(self, delta_set: Sequence[float], seed: int) -> None:
        values = np.asarray(list(delta_set), dtype=np.float64)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"v2pe delta_set must be a non-empty list of floats, got {delta_set!r}")
        if not np.all((values > 0.0) & (values <= 1.0)):
            raise ValueError(f"every value of v2pe delta_set must be in (0, 1], got {list(values)}")
        if int(seed) < 0:
            raise ValueError(f"v2pe seed must be >= 0, got {seed}")
        self.delta_set = values
        self.seed = int(seed)

    def deltas(self, num_images: int, sample_key: int) -> np.ndarray:
        self._check(num_images)
        if int(sample_key) < 0:
            raise ValueError(f"sample_key must be a non-negative integer, got {sample_key}")
        rng = np.random.default_rng([self.seed, int(sample_key)])
        return self.delta_set[rng.integers(0, self.delta_set.size, size=num_images)]

    def __repr__(self) -> str:
        return f"RandomDeltaPolicy(delta_set={self.delta_set.tolist()}, seed={self.seed})"


def make_delta_policy(cfg: "V2PEConfig") -> DeltaPolicy:
    """The policy named by ``cfg.policy`` ('default' | 'fixed' | 'random')."""
    if cfg.policy == "default":
        return DefaultDeltaPolicy()
    if cfg.policy == "fixed":
        return FixedDeltaPolicy(cfg.delta)
    if cfg.policy == "random":
        return RandomDeltaPolicy(cfg.delta_set, cfg.seed)
    raise ValueError(f"v2pe.policy={cfg.policy!r} is not one of default, fixed, random")



# ---------------------------------------------------------------------------------------------
# Rotary embedding
# ---------------------------------------------------------------------------------------------
class V2PERotaryEmbedding(torch.nn.Module):
    """Rotary embedding from float64 V2PE positions: the angles, and the cos/sin the model applies.

    ``cos_sin(position_ids, dtype)`` takes float64 positions [B, S] (torch or numpy; a 1-D [S] is
    taken as B = 1) and returns ``(cos, sin)``, each [S, B, 1, D] in ``dtype`` (D = rotary dim),
    laid out NeoX-style (non-interleaved, ``cat(angles, angles)`` along D); :func:`apply_rotary`
    rotates a query or key with them. The model computes them once per micro-batch and every layer
    applies the same pair (``model.attention.V2PERotary``), instead of megatron's rotary path that
    takes ``cos``/``sin`` of float32 angles again for q and for k in every layer and, for packed
    ``thd`` batches, reads the sequence lengths back from the device per sub-sample.

    ``forward(position_ids)`` returns the float32 angles [S, B, 1, D] in the layout megatron-core's
    unfused ``apply_rotary_pos_emb(t, freqs, config)`` expects (it takes ``cos``/``sin`` of
    ``freqs``), for callers that use megatron's rotary path.

    Accuracy: the angles ``pos * inv_freq`` are formed in float64. ``cos_sin`` evaluates cos and sin
    in float64 and rounds once, to ``dtype`` (the last rounding is the model dtype's own: 4e-3 in
    bf16, 6e-8 in fp32). ``forward`` reduces the angles modulo 2*pi into [-pi, pi) in float64
    before the float32 cast, so megatron's float32 ``cos``/``sin`` of them are accurate to ~2e-7 at
    any position (at 2^20 an unreduced float32 angle is already off by ~0.03 rad). Positions must
    therefore stay float64 up to this module (megatron's ``Float16Module`` only casts float32
    inputs, so float64 positions pass through it unchanged).

    Constraints for the caller: fused RoPE stays off (``apply_rope_fusion=False``,
    ``fused_single_qkv_rope=False``: the angles differ per token and per batch row);
    ``rotary_interleaved=False`` (InternLM2 / Qwen2 / Llama use rotate_half); under context
    parallelism the positions are sliced with the same index map as the tokens
    (``parallel.packed_seq.split_batch_for_cp``), so each rank computes its own tokens' cos/sin.

    ``inv_freq`` is a plain float64 attribute, not a buffer, so ``model.bfloat16()`` / ``.half()``
    cannot degrade it and checkpoints do not carry it (as in megatron's ``RotaryEmbedding``).
    """

    # Bounds the float64 temporaries ([chunk, D/2] per row) for million-token sequences.
    _CHUNK_TOKENS = 1 << 16

    def __init__(self, kv_channels: int, rotary_base: float, rotary_percent: float = 1.0) -> None:
        super().__init__()
        if not 0.0 < rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent must be in (0, 1], got {rotary_percent}")
        dim = kv_channels if rotary_percent >= 1.0 else int(kv_channels * rotary_percent)
        if dim < 2 or dim % 2:
            raise ValueError(f"rotary dim {dim} (kv_channels={kv_channels} x rotary_percent={rotary_percent}) "
                             f"must be even and >= 2")
        if rotary_base <= 0:
            raise ValueError(f"rotary_base must be > 0, got {rotary_base}")
        self.dim = dim
        self.rotary_base = float(rotary_base)
        self.inv_freq = 1.0 / (self.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = self.inv_freq.to(device)
        return self._inv_freq_on[device]

    def _positions(self, position_ids: Any, device: torch.device | str | None) -> torch.Tensor:
        if isinstance(position_ids, np.ndarray):
            position_ids = torch.from_numpy(np.ascontiguousarray(position_ids, dtype=np.float64))
        if not isinstance(position_ids, torch.Tensor):
            raise TypeError(f"position_ids must be a torch tensor or numpy array, got {type(position_ids)}")
        if position_ids.dim() == 1:
            position_ids = position_ids[None, :]
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [B, S], got shape {tuple(position_ids.shape)}")
        if device is not None:
            position_ids = position_ids.to(device)
        return position_ids.to(torch.float64)

    def _angles(self, pos: torch.Tensor):
        """(lo, hi, float64 angles [hi - lo, B, D/2]) over chunks of the sequence."""
        inv_freq = self._inv_freq(pos.device)
        for lo in range(0, pos.shape[1], self._CHUNK_TOKENS):
            hi = min(pos.shape[1], lo + self._CHUNK_TOKENS)
            yield lo, hi, pos[:, lo:hi].transpose(0, 1)[..., None] * inv_freq

    def forward(self, position_ids: Any, device: torch.device | str | None = None) -> torch.Tensor:
        """float32 [S, B, 1, D] angles for float64 ``position_ids`` [B, S]; computed on
        ``position_ids``' device (numpy: ``device``, default CPU)."""
        pos = self._positions(position_ids, device)
        batch, seq = pos.shape
        half = self.dim // 2
        out = torch.empty(seq, batch, 1, self.dim, dtype=torch.float32, device=pos.device)
        for lo, hi, angles in self._angles(pos):
            # Reduce into [-pi, pi) in float64: the float32 cast then loses < 2e-7 rad.
            reduced = (torch.remainder(angles + math.pi, 2.0 * math.pi) - math.pi).to(torch.float32)
            out[lo:hi, :, 0, :half] = reduced
            out[lo:hi, :, 0, half:] = reduced
        return out

    def cos_sin(self, position_ids: Any, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [S, B, 1, D] in ``dtype``, evaluated in float64 from float64
        ``position_ids`` [B, S], on their device (numpy: ``device``, default CPU)."""
        pos = self._positions(position_ids, device)
        batch, seq = pos.shape
        half = self.dim // 2
        cos = torch.empty(seq, batch, 1, self.dim, dtype=dtype, device=pos.device)
        sin = torch.empty_like(cos)
        for lo, hi, angles in self._angles(pos):
            for out, values in ((cos, torch.cos(angles)), (sin, torch.sin(angles))):
                values = values.to(dtype)
                out[lo:hi, :, 0, :half] = values
                out[lo:hi, :, 0, half:] = values
        return cos, sin

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rotary_base={self.rotary_base}"


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``t * cos + rotate_half(t) * sin`` on the first ``cos.shape[-1]`` channels of ``t`` (the
    rest pass unchanged): NeoX-style rotary, as HF's InternLM2/Qwen2/Llama and megatron's unfused
    non-interleaved path compute it. ``cos``/``sin`` broadcast against ``t`` ([s, b, heads, d]
    with [s, b, 1, d], or Transformer Engine's packed [t, heads, d] with [t, 1, d])."""
    dim = cos.shape[-1]
    rot, rest = (t, None) if t.shape[-1] == dim else (t[..., :dim], t[..., dim:])
    x1, x2 = rot.chunk(2, dim=-1)
    out = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return out if rest is None else torch.cat((out, rest), dim=-1)
