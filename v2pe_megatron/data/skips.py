"""Bad input is counted, not fatal: one counter per reason a sample was dropped."""

from __future__ import annotations

import logging
from collections.abc import Mapping

log = logging.getLogger("v2pe_megatron.data")

# Every reason a sample can be dropped, in the order reports list them.
REASONS: tuple[str, ...] = (
    "bad_utf8",              # the jsonl line is not UTF-8
    "bad_json",              # not a JSON object
    "bad_record",            # JSON but not a sample (wrong field types, unknown roles)
    "empty_conversation",    # no conversation turns / no assistant answer / empty text
    "image_count_mismatch",  # number of <image> placeholders != number of images
    "missing_image",         # image file (or tar member) not found
    "corrupt_image",         # header unreadable or decode failed (truncated, not an image)
    "oversized_image",       # the header claims more pixels than data.max_image_pixels
    "bad_markup",            # the text itself contains image markup tokens
    "too_long",              # longer than seq_length with data.overlong=skip
    "too_many_tiles",        # more tiles than data.max_tiles_per_pack
    "no_loss_tokens",        # nothing left to train on (e.g. truncated before the answer)
)

# Log the first few occurrences of each reason with their detail; afterwards only count.
_LOG_FIRST = 3


class SampleError(Exception):
    """A sample that must be skipped; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        # Which sample: "<annotation file>:<line> id=<id>" (set by the loader, which knows).
        self.where = ""


class NoUsableSamplesError(RuntimeError):
    """Every sample read so far was bad: the data (or the recipe) is wrong, not a few samples."""


class SkipCounter:
    def __init__(self, counts: Mapping[str, int] | None = None) -> None:
        self.counts: dict[str, int] = {r: 0 for r in REASONS}
        if counts:
            self.counts.update({k: int(v) for k, v in counts.items()})

    def add(self, err: SampleError, where: str = "") -> None:
        n = self.counts.get(err.reason, 0) + 1
        self.counts[err.reason] = n
        if n <= _LOG_FIRST:
            log.warning("skipped sample %s: %s%s", err.where or where, err,
                        " (further ones are only counted)" if n == _LOG_FIRST else "")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def nonzero(self) -> dict[str, int]:
        return {k: v for k, v in self.counts.items() if v}

    def copy(self) -> "SkipCounter":
        return SkipCounter(self.counts)

    def report_lines(self) -> list[str]:
        return [f"skipped {k}: {v}" for k, v in self.counts.items() if v]
