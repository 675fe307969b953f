"""The converter's error types: bad input (``HFCheckpointError``, exit 2) and a failure while working
(``ConvertWriteError``, ``VerifyError``, exit 1). Either way nothing is published."""

from __future__ import annotations


class HFCheckpointError(ValueError):
    """Input the converter cannot use: a checkpoint that does not match its config or our model, a
    damaged file, an ``--out`` that would destroy an input. The message names the tensor (or file,
    or flag) and the fix."""


class VerifyError(HFCheckpointError):
    """``--verify``: the two sides' logits differ beyond the tolerance (the output is not published)."""


class ConvertWriteError(RuntimeError):
    """Writing the output failed (a full disk, an I/O error); the partial output was removed.
    ``everywhere``: every rank of an import has it (megatron's save gathers the failures), so rank 0
    alone says it."""

    def __init__(self, message: str, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere
