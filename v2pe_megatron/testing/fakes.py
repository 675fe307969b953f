"""Stand-ins for distributed objects in tests (Transformer Engine's: :mod:`v2pe_megatron.testing.fake_te`)."""

from __future__ import annotations


class FakeGroup:
    """What megatron's unfused THD rotary path reads from a CP group: ``size()`` and ``rank()``."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank
