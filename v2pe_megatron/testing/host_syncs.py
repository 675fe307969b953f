"""Count the operations that make the host wait for the device, on a machine without one.

On a GPU, every value the host reads back (``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``, a copy
to the CPU) and every op whose output size depends on the data (``nonzero``, ``masked_select``,
``unique``, ``repeat_interleave`` with tensor repeats, boolean-mask indexing) blocks until the queued
kernels have run: one such call per layer serializes the whole forward. ``torch.cuda.
set_sync_debug_mode`` finds them on a GPU; :class:`HostSyncCounter` finds the same calls on the CPU,
where every tensor is a host tensor, by wrapping those torch methods and functions while it is
active. It wraps them on the classes (not with a ``TorchFunctionMode``, which autograd's backward
pass does not see), so the backward pass, recompute included, is counted too.

What is deliberately on the host (the data pipeline's packing metadata before it is moved to the
device, or a stand-in for a GPU library's kernel) runs inside :meth:`HostSyncCounter.paused`.

Not counted: boolean-mask indexing (``t[mask]``). Giving ``torch.Tensor`` a Python ``__getitem__``,
even for a moment, makes CPython treat tensors as sequences in torch's own C++ list parsing; the
project's step code has none (grep for it when adding code to the hot path).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
import traceback
from typing import Any, Callable, Iterator, Optional

import torch

__all__ = ["HostSyncCounter", "SYNC_METHODS", "DATA_DEPENDENT"]

# Tensor methods that read a value back to the host.
SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")
# Tensor methods and torch functions whose output shape depends on the data.
DATA_DEPENDENT = ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive")


def _cpu_target(args: tuple, kwargs: dict) -> bool:
    """``.to("cpu")``: only a CPU target spelled out is a copy back to the host; a device object is
    the compute device (the CPU here, a GPU on the machines this counts for)."""
    target = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
    return isinstance(target, str) and target.split(":")[0] == "cpu"


# name -> (what to count it as, or a predicate (args, kwargs) -> bool deciding whether it syncs)
_CONDITIONAL: dict[str, Callable[[tuple, dict], bool]] = {
    "repeat_interleave": lambda args, kwargs: "output_size" not in kwargs and any(
        torch.is_tensor(a) and a.dim() > 0 for a in (args[0] if args else None, kwargs.get("repeats"))),
    "to": _cpu_target,
}


class HostSyncCounter:
    """``with HostSyncCounter() as c: ...`` then ``c.count`` (and ``c.sites``: where, by call site).

    Counted: :data:`SYNC_METHODS` and :data:`DATA_DEPENDENT` (as tensor methods and, for the latter,
    torch functions), ``repeat_interleave`` with tensor repeats and no ``output_size``, and
    ``.to("cpu")``. Calls made inside another counted call (torch's own Python code) count once.
    """

    def __init__(self) -> None:
        self.count = 0
        self.sites: collections.Counter = collections.Counter()
        self._paused = 0
        self._local = threading.local()
        self._undo: list[tuple[Any, str, Any]] = []

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _record(self, name: str) -> None:
        self.count += 1
        frames = [f for f in traceback.extract_stack(limit=14) if not f.filename.endswith("host_syncs.py")]
        where = frames[-1] if frames else None
        self.sites[f"{name} at {where.filename}:{where.lineno}" if where else name] += 1

    def _wrap(self, owner: Any, name: str, predicate: Optional[Callable[[tuple, dict], bool]], method: bool):
        orig = getattr(owner, name)

        @functools.wraps(orig)
        def wrapper(*args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if not self._paused and depth == 0:
                rest = args[1:] if method else args
                if predicate is None or predicate(rest, kwargs):
                    self._record(name)
            self._local.depth = depth + 1
            try:
                return orig(*args, **kwargs)
            finally:
                self._local.depth = depth

        # Undo by deleting what was only inherited: re-assigning an inherited slot method would leave a
        # Python-level slot behind.
        self._undo.append((owner, name, orig if name in vars(owner) else None))
        setattr(owner, name, wrapper)

    def __enter__(self) -> "HostSyncCounter":
        for name in SYNC_METHODS + DATA_DEPENDENT:
            self._wrap(torch.Tensor, name, None, method=True)
        for name in DATA_DEPENDENT:
            if hasattr(torch, name):
                self._wrap(torch, name, None, method=False)
        for name, predicate in _CONDITIONAL.items():
            self._wrap(torch.Tensor, name, predicate, method=True)
        self._wrap(torch, "repeat_interleave",
                   lambda args, kwargs: _CONDITIONAL["repeat_interleave"](args[1:], kwargs), method=False)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, orig in reversed(self._undo):
            if orig is None:
                delattr(owner, name)
            else:
                setattr(owner, name, orig)
        self._undo.clear()
