"""Bad input is counted, not fatal: one counter per reason a sample was dropped.

Next to the skips, the same counter holds :data:`NOTES`: things done to samples that were *kept*
(an image tiled by Pillow because DALI cannot decode it as InternVL would), so that every report
and the checkpointed loader state carry them too, without counting them as skips.

The counters are cumulative over the run (and its resumes): a bad sample is read, and counted,
again in every epoch, so after k epochs a bad sample has counted k times. Reports say so
(:func:`describe`); ``v2pe-data inspect`` reads one epoch and lists every skip (``--skips-file``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

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

# Kept samples, counted (same counter, not skips).
NOTES: tuple[str, ...] = (
    "decoded_by_pillow",     # an image DALI cannot decode like Pillow (InternVL's path): Pillow tiled it
)
_NOTE_TEXT = {"decoded_by_pillow": "images decoded by Pillow (DALI cannot decode them as InternVL would; kept)"}

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
        # Which sample: "<annotation file>:<line> id=<id>" (set by the loader, which knows), and the
        # same as fields for a skip record: {"file", "line"} / {"file", "key"} / {"dataset", "index"}.
        self.where = ""
        self.source: dict[str, object] = {}
        self.sample_id = ""


class NoUsableSamplesError(RuntimeError):
    """Every sample read so far was bad: the data (or the recipe) is wrong, not a few samples."""


class SkipCounter:
    """Skips by reason (:data:`REASONS`) plus the :data:`NOTES` counters, cumulative over epochs."""

    def __init__(self, counts: Mapping[str, int] | None = None) -> None:
        self.counts: dict[str, int] = {r: 0 for r in REASONS + NOTES}
        if counts:
            self.counts.update({k: int(v) for k, v in counts.items()})

    def add(self, err: SampleError, where: str = "") -> None:
        n = self.counts.get(err.reason, 0) + 1
        self.counts[err.reason] = n
        if n <= _LOG_FIRST:
            log.warning("skipped sample %s: %s%s", err.where or where, err,
                        " (further ones are only counted)" if n == _LOG_FIRST else "")

    def note(self, kind: str, detail: str, where: str | Callable[[], str] = "") -> None:
        """Count a kept sample's ``kind`` (one of :data:`NOTES`); the first few are logged (``where``
        may be a callable, called only then)."""
        if kind not in NOTES:
            raise ValueError(f"unknown note {kind!r}")
        n = self.counts.get(kind, 0) + 1
        self.counts[kind] = n
        if n <= _LOG_FIRST:
            log.info("%s %s: %s%s", kind, where() if callable(where) else where, detail,
                     " (further ones are only counted)" if n == _LOG_FIRST else "")

    @property
    def total(self) -> int:
        """Samples skipped (notes are not skips)."""
        return sum(v for k, v in self.counts.items() if k not in NOTES)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def nonzero(self) -> dict[str, int]:
        """Nonzero skip counters (without the notes)."""
        return {k: v for k, v in self.counts.items() if v and k not in NOTES}

    def copy(self) -> "SkipCounter":
        return SkipCounter(self.counts)

    def report_lines(self) -> list[str]:
        """``skipped <reason>: n`` per nonzero reason, then one line per nonzero note."""
        return ([f"skipped {k}: {v}" for k, v in self.nonzero().items()]
                + [f"{_NOTE_TEXT[k]}: {self.counts[k]}" for k in NOTES if self.counts.get(k)])

    def metrics(self) -> dict[str, int]:
        """Tracker metrics: ``skipped/<reason>`` and ``data/<note>``, all of them (zeros too)."""
        return {f"{'data' if k in NOTES else 'skipped'}/{k}": v for k, v in self.counts.items()}


def describe(counts: Mapping[str, int]) -> str:
    """One log-line fragment for cumulative counters ("" when all are zero), saying that a bad
    sample counts once per epoch it is read."""
    c = SkipCounter(counts)
    parts = []
    if c.total:
        parts.append("skipped so far (a bad sample counts once per epoch) "
                     + ", ".join(f"{k}={v}" for k, v in c.nonzero().items()))
    parts += [f"{k}={c.counts[k]}" for k in NOTES if c.counts.get(k)]
    return "  ".join(parts)
