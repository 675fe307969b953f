"""The micro-batch: what flows loader -> packing -> context-parallel split -> forward step.

One dataclass, so every stage names the same fields and none re-lists them. The data pipeline fills
the per-token tensors, the tiles and the per-row sub-sample lengths (``data.packing.collate``); the
CP split (:func:`v2pe_megatron.parallel.packed_seq.split_batch_for_cp`) returns a new batch with this
rank's share of the tokens and the attention metadata (``packed_seq_params``,
``image_exchange``) filled in; the forward step moves it to the device and calls the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from v2pe_megatron.parallel.cp_split import ImageExchange

__all__ = ["MicroBatch", "TOKEN_FIELDS", "OPTIONAL_TOKEN_FIELDS"]

# Per-token [B, S] tensors: sliced together with one index map under context parallelism.
TOKEN_FIELDS = ("tokens", "labels", "loss_mask", "position_ids")
# Per-token [B, S] tensors a batch may carry (None otherwise), sliced like TOKEN_FIELDS.
OPTIONAL_TOKEN_FIELDS = ("loss_weight",)


@dataclass
class MicroBatch:
    tokens: Tensor                     # int64 [B, S]
    labels: Tensor                     # int64 [B, S]: the next token inside each sub-sample
    loss_mask: Tensor                  # float32 [B, S]: 1 where ``labels`` is an assistant target
    position_ids: Tensor               # float64 [B, S]: V2PE positions, restarting per sub-sample
    seq_lens: list[Tensor]             # per row, int32 padded sub-sample lengths (the tail included)
    pixel_values: Optional[Tensor] = None   # float32 [T, 3, H, W], the tiles of all rows in row order
    # [start, stop) when ``pixel_values`` holds only these tiles of the micro-batch (one CP rank's
    # ``parallel.cp_split.tile_share``, decoded alone by the loader); None: every tile.
    tile_range: Optional[tuple[int, int]] = None
    num_tiles: Optional[Tensor] = None      # int32 [images]: tiles per image, in row order
    deltas: Optional[Tensor] = None         # float64 [images]: the V2PE delta each image was placed with
    sample_ids: Optional[list] = None       # per row, the ids of the samples packed into it
    # float32 [B, S]: per-token loss weight (train.loss_reduction=square), set on the whole pack before
    # the context-parallel split so that each rank's share carries its tokens' weights.
    loss_weight: Optional[Tensor] = None
    # Filled in by the context-parallel split:
    packed_seq_params: Optional[PackedSeqParams] = None
    # Which of the whole batch's image features this CP rank's tokens take, for callers that hold
    # every tile (the all-gather reference path of model.vision_cp); the CP split sets image_exchange.
    image_feature_index: Optional[Tensor] = None
    image_exchange: Optional[ImageExchange] = None  # the CP rank's image-feature all-to-all plan
    # <IMG_CONTEXT> tokens among this rank's tokens, counted on the host by the split (the model checks
    # the image features against it without reading a count back from the device).
    num_image_tokens: Optional[int] = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)  # type: ignore[return-value]

    def token_fields(self) -> tuple[str, ...]:
        """The per-token fields this batch carries (TOKEN_FIELDS + the optional ones that are set)."""
        return TOKEN_FIELDS + tuple(k for k in OPTIONAL_TOKEN_FIELDS if getattr(self, k) is not None)

    @property
    def num_images(self) -> int:
        return 0 if self.num_tiles is None else int(self.num_tiles.numel())

    @property
    def pack_tiles(self) -> int:
        """Tiles of the whole micro-batch, also where ``pixel_values`` holds only a CP rank's share."""
        if self.num_tiles is not None:
            return int(self.num_tiles.sum())
        if self.tile_range is not None:
            raise ValueError("a batch holding a tile share (tile_range) must carry num_tiles")
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])

    def replace(self, **changes) -> "MicroBatch":
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> "MicroBatch":
        """Tensors the model reads moved to ``device``; ``pixel_values`` cast to the model's ``dtype``
        (an empty set of tiles becomes None: a text-only batch, or a CP rank whose tile share is empty).

        To a GPU the copies are asynchronous, from page-locked memory (:meth:`pin_memory`; what the
        loader already pinned is not copied again): the host goes on queueing the step's kernels
        instead of waiting for each field's transfer."""
        device = torch.device(device)

        def move(t: Tensor, cast: Optional[torch.dtype] = None) -> Tensor:
            if device.type == "cuda" and t.device.type == "cpu":
                return _pinned(t).to(device=device, dtype=cast, non_blocking=True)
            return t.to(device=device, dtype=cast)

        pv = self.pixel_values
        pv = move(pv, dtype) if pv is not None and pv.numel() else None
        idx, plan = self.image_feature_index, self.image_exchange
        psp = self.packed_seq_params
        if getattr(psp, "loss_rows", None) is not None:  # the output layer indexes the hidden states with it
            psp = dataclasses.replace(psp, loss_rows=move(psp.loss_rows), memo=psp.memo)
        return self.replace(**{k: move(getattr(self, k)) for k in self.token_fields()}, pixel_values=pv,
                            image_feature_index=move(idx) if idx is not None else None,
                            image_exchange=plan.to(device) if plan is not None else None,
                            packed_seq_params=psp)

    def pin_memory(self) -> "MicroBatch":
        """The host tensors in page-locked memory (needs CUDA), so that :meth:`to` copies them to the
        GPU asynchronously; the data loader calls it in its own thread, off the training step."""
        return self.replace(**{k: _pinned(getattr(self, k)) for k in self.token_fields()},
                            pixel_values=_pinned(self.pixel_values) if self.pixel_values is not None else None)


def _pinned(t: Tensor) -> Tensor:
    return t if t.device.type != "cpu" or t.is_pinned() else t.pin_memory()
