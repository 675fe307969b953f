"""Stand-ins for distributed objects and checkpoint folders in tests (Transformer Engine's:
:mod:`v2pe_megatron.testing.fake_te`)."""

from __future__ import annotations

import json
from pathlib import Path


class FakeGroup:
    """What megatron's unfused THD rotary path reads from a CP group: ``size()`` and ``rank()``."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def checkpoint_folder(ckpt: Path, iteration: int, *, latest: bool = True) -> Path:
    """An ``iter_*`` folder as a finished save leaves it, by names and sizes (one data file and its
    manifest; no torch_dist contents): what ``training.checkpoint_files`` reads."""
    from v2pe_megatron.training.checkpoint_files import MANIFEST, iteration_dir

    it = iteration_dir(ckpt, iteration)
    it.mkdir(parents=True)
    (it / "__0_0.distcp").write_bytes(b"x" * 100)
    (it / MANIFEST).write_text(json.dumps(
        {"version": 1, "files": {"__0_0.distcp": {"size": 100, "sha256": "not read by the size check"}}}))
    if latest:
        (ckpt / "latest").write_text(str(iteration))
    return it
