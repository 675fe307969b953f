"""Resident-memory readings the benchmarks share (Linux ``/proc/self``).

A step's peak is ``VmHWM`` after resetting the high-water mark (``clear_refs`` 5), minus ``VmRSS``
just before: the kernel's own numbers, with no sampling thread that could miss a short peak.
"""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_memory() -> None:
    """Free what Python and glibc still hold, so the next peak starts from what is really in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak() -> None:
    """Restart ``VmHWM`` from the current resident size."""
    Path("/proc/self/clear_refs").write_text("5")
