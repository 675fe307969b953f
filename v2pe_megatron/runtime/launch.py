"""Start N local ranks without a port race, and stop them with the parent.

The parent process hosts the rendezvous TCPStore on a port the OS assigns (bind to port 0), then
starts the ranks with ``MASTER_PORT`` set to it and ``TORCHELASTIC_USE_AGENT_STORE=True``, torch's
convention (the one torchrun's agent uses) for "connect to the store, do not host one". Choosing a
free port first and binding it later in a child races with every other connection the machine opens
in between; this cannot.

Signals: the parent forwards SIGTERM, SIGUSR1 and SIGINT to every rank (the ranks run in their own
session, so a terminal's Ctrl-C reaches them once, through the parent) and returns the ranks' code
(``exit_codes.RESUME`` after a signal, or ``exit_codes.stopped(N)`` when nothing new was saved). If
the parent dies, even by SIGKILL, each rank gets SIGTERM from the kernel
(``signals.die_with_parent``). A rank that fails takes the others down: SIGTERM, then SIGKILL after
``FAIL_GRACE_S`` (a graceful stop needs every rank, so it may never complete; the checkpoint on disk
is the last complete one whatever happens, saves being atomic). The parent's last line names the
rank that failed first, its pid and its exit code or signal (:func:`describe_failure`): the other
ranks' errors ("Connection reset by peer", a collective's timeout) are only the consequence.

Environment: each rank gets :data:`RANK_ENV_DEFAULTS` (``CUDA_DEVICE_MAX_CONNECTIONS=1``, as
``slurm/job.sh`` exports for srun) unless the caller's environment sets them.
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

from v2pe_megatron.runtime import exit_codes
from v2pe_megatron.runtime.signals import STOP_SIGNALS, die_with_parent

# After a rank failed, how long the others get between SIGTERM and SIGKILL: enough to close the
# MLflow run as FAILED, short enough that a rank stuck in a collective with the lost rank (NCCL waits
# for its timeout) does not hold the job.
FAIL_GRACE_S = 10.0
GRACEFUL = (exit_codes.SUCCESS, exit_codes.RESUME, exit_codes.NONFINITE,
            *(exit_codes.stopped(s) for s in exit_codes.STOP_SIGNALS))

# Set in every rank's environment unless the user set them (slurm/job.sh sets the same for srun):
# in the environment, not in the rank's code, because CUDA reads them when it initializes.
RANK_ENV_DEFAULTS = {
    "OMP_NUM_THREADS": "1",  # as torchrun does: N ranks share the cores
    # megatron-core's TP / sequence-parallel and CP communication overlap relies on kernels being
    # issued in order on one hardware queue; megatron-core asks for this setting.
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
}


def host_store(world_size: int, timeout_minutes: float = 30.0) -> TCPStore:
    return TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                    timeout=_dt.timedelta(minutes=timeout_minutes))


def rank_env(store: TCPStore, rank: int, world_size: int) -> dict[str, str]:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0"}


def run_local(argv: Sequence[str], nproc: int, *, env: dict[str, str] | None = None) -> int:
    """Run ``python <argv>`` as ``nproc`` ranks on this machine; return the first non-zero exit code
    (a failing rank's code wins over the graceful ones), or 0."""
    store = host_store(nproc)
    base = {**RANK_ENV_DEFAULTS, **(os.environ if env is None else env)}
    me = os.getpid()
    procs: list[subprocess.Popen] = []

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        procs.extend(subprocess.Popen([sys.executable, *argv], env={**base, **rank_env(store, r, nproc)},
                                      start_new_session=True, preexec_fn=lambda: die_with_parent(me))
                     for r in range(nproc))
        return _wait(procs)
    finally:
        for p in procs:  # only reached with live ranks if the parent itself fails
            if p.poll() is None:
                p.kill()
                p.wait()
        for s, h in previous.items():
            signal.signal(s, h)
        del store


def describe_failure(rank: int, pid: int, returncode: int) -> str:
    """One line naming a failed rank: ``returncode`` as ``subprocess`` reports it (-N: killed by signal N)."""
    if returncode >= 0:
        return f"rank {rank} (pid {pid}) exited with code {returncode}: its messages above say why"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    text = f"rank {rank} (pid {pid}) was killed by {name} (exit code {128 - returncode})"
    if -returncode == signal.SIGKILL:
        text += (": nothing in the run sends SIGKILL; the usual sender is the kernel's out-of-memory killer "
                 f"(check 'dmesg -T | grep -i -e oom -e {pid}'; under Slurm 'sacct -j $SLURM_JOB_ID "
                 "--format=JobID,State,MaxRSS,ReqMem'); lower data.micro_batch_size / data.seq_length or "
                 "use more ranks")
    elif -returncode in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE):
        text += ": a crash in native code (torch, a CUDA library, a data decoder)"
    return text


def _wait(procs: list[subprocess.Popen]) -> int:
    live, code, kill_at, failed = list(procs), 0, None, None
    while live:
        for p in list(live):
            rc = p.poll()
            if rc is None:
                continue
            live.remove(p)
            shell_rc = 128 - rc if rc < 0 else rc  # killed by signal N: the shell's 128+N
            if shell_rc != 0 and (code == 0 or (code in GRACEFUL and shell_rc not in GRACEFUL)):
                code = shell_rc
            if shell_rc not in GRACEFUL and kill_at is None:
                failed = describe_failure(procs.index(p), p.pid, rc)
                # a lost rank leaves the others waiting in a collective
                for other in live:
                    other.send_signal(signal.SIGTERM)
                kill_at = time.monotonic() + FAIL_GRACE_S
        if kill_at is not None and time.monotonic() > kill_at:
            for p in live:
                p.kill()
        time.sleep(0.1)
    if failed:  # last, below the other ranks' consequential errors
        print(f"v2pe: {failed}; the other ranks were stopped", file=sys.stderr, flush=True)
    return code
