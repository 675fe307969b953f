"""Stop requests by signal, and ranks that do not outlive their launcher.

A rank never acts on a signal where it arrives: the handler only records it, and the training loop
folds the record into the one collective it runs after every step, so all ranks stop after the
same step, save one complete checkpoint and exit with ``exit_codes.RESUME`` (with no
``checkpoint.dir``, or before the first step, nothing new is saved and the code is
``exit_codes.stopped(N)``: ``training.loop``). This works whether the
signal reaches every process (Slurm signals all tasks of a step) or only some (the self-launching
parent forwards what it gets; a rank that got nothing learns it from the collective). Repeated
signals are recorded once and otherwise ignored, so a second SIGTERM during the save cannot cut
it short; a save is atomic anyway (``training.checkpointing``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from typing import Optional

from v2pe_megatron.runtime import exit_codes

log = logging.getLogger("v2pe_megatron.train")

STOP_SIGNALS = exit_codes.STOP_SIGNALS


class StopSignals:
    """Records the first stop signal; ``install()`` in the main thread, ``restore()`` when done."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; its owner decides there
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            # a handler must not log (re-entrancy); a plain write to stderr is safe enough
            os.write(2, f"v2pe-train: rank pid {os.getpid()} got {signal.Signals(signum).name}: finishing "
                        f"this step, then stopping\n".encode())

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""


_PR_SET_PDEATHSIG = 1
# Looked up here, in the parent: between fork and exec a child of a threaded process must not dlopen.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (also by SIGKILL), so a rank
    started by ``runtime.launch`` never trains on as an orphan. For ``subprocess.Popen(preexec_fn=)``:
    runs in the child between fork and exec (the setting survives exec). SIGTERM, not SIGKILL, so the
    rank still stops through the loop's usual path; elsewhere than Linux it does nothing."""
    if _prctl is None:
        return
    _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)
