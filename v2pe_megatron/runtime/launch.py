"""Start N local ranks without a port race.

The parent process hosts the rendezvous TCPStore on a port the OS assigns (bind to port 0), then
starts the ranks with ``MASTER_PORT`` set to it and ``TORCHELASTIC_USE_AGENT_STORE=True``, torch's
convention (the one torchrun's agent uses) for "connect to the store, do not host one". Choosing a
free port first and binding it later in a child races with every other connection the machine opens
in between; this cannot.
"""

from __future__ import annotations

import datetime as _dt
import os
import signal
import subprocess
import sys
import time
from typing import Sequence

from torch.distributed import TCPStore


def host_store(world_size: int, timeout_minutes: float = 30.0) -> TCPStore:
    return TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                    timeout=_dt.timedelta(minutes=timeout_minutes))


def rank_env(store: TCPStore, rank: int, world_size: int) -> dict[str, str]:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0"}


def run_local(argv: Sequence[str], nproc: int, *, env: dict[str, str] | None = None) -> int:
    """Run ``python <argv>`` as ``nproc`` ranks on this machine; return the first non-zero exit code
    (the others are stopped), or 0."""
    store = host_store(nproc)
    base = dict(os.environ if env is None else env)
    base.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does: N ranks share the cores
    procs = [subprocess.Popen([sys.executable, *argv], env={**base, **rank_env(store, r, nproc)})
             for r in range(nproc)]
    code = 0
    try:
        while procs:
            for p in list(procs):
                rc = p.poll()
                if rc is None:
                    continue
                procs.remove(p)
                if rc != 0 and code == 0:
                    code = rc
                    for other in procs:  # a lost rank would leave the others waiting in a collective
                        other.send_signal(signal.SIGTERM)
            time.sleep(0.1)
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        return 130
    finally:
        del store
    return code
