"""The converter's one error type."""

from __future__ import annotations


class HFCheckpointError(ValueError):
    """A checkpoint that does not match its config or our model; the message names the tensor and the fix."""
