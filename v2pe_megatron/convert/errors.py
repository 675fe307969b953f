"""The converter's error types: bad input (``HFCheckpointError``, exit 2) and a failure while working
(``ConvertWriteError``, ``VerifyError``, exit 1). Either way nothing is published."""

from __future__ import annotations


class HFCheckpointError(ValueError):
    """A checkpoint that does not match its config or our model; the message names the tensor and the fix."""


class VerifyError(HFCheckpointError):
    """``--verify``: the two sides' logits differ beyond the tolerance (the output is not published)."""


class ConvertWriteError(RuntimeError):
    """Writing the output failed (a full disk, an I/O error); the partial output was removed."""
