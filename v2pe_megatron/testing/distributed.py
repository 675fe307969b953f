"""Run a function on N gloo ranks in fresh processes and collect each rank's result.

Used by the tests ("layout X gives the same logits and gradients as 1 rank") and by benchmarks.
Each rank is a fresh process that never ran anything of an earlier group, so megatron-core's global
parallel state never leaks between layouts. The failing rank's traceback is re-raised in the parent;
a hung collective ends at the timeout with every rank killed, instead of hanging the test session.

Where there is no CUDA, ranks are forked from a ``forkserver`` that has imported torch and
megatron-core once (:data:`PRELOAD`) and done nothing else: a rank starts in a fraction of a second
instead of re-importing them (~4-5 s of CPU per rank, which was most of a small parity test's time
on a 2-core machine). Every rank imports megatron-core before it can run anything, so a preloaded one
is the module a spawned rank would have imported; the rank gets the caller's current environment and
stdout/stderr, as a spawned one does. With CUDA, ranks are ``spawn``-ed as before (a fork after a
library touched CUDA cannot use CUDA).
"""

from __future__ import annotations

import os
import pickle
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch.multiprocessing as mp

# Imported once into the fork server (where there is no CUDA). Only modules every rank imports before
# it runs anything (the harness imports torch, fake_te imports megatron-core before installing itself),
# so a forked rank holds exactly the modules a spawned one would; read-at-import environment variables
# are the server's (none of this project's tests set one that torch or megatron-core reads at import).
PRELOAD = ("torch", "torch.distributed", "numpy", "megatron.core")


class DistributedTestError(AssertionError):
    """A rank raised, died, or the group timed out. The message holds the rank's traceback."""


@dataclass
class _Outcome:
    rank: int
    ok: bool
    payload: Any  # result (ok) or formatted traceback


class _CallerStdio:
    """The caller's stdout and stderr as they are when the ranks start (e.g. pytest's capture file of
    the running test), handed to a rank as file descriptors: a forked rank would otherwise write to
    the fork server's, those of whatever test started the server."""

    def __reduce__(self):
        from multiprocessing import reduction

        for s in (sys.stdout, sys.stderr):
            s.flush()
        return _use_stdio, (reduction.DupFd(1), reduction.DupFd(2))


def _use_stdio(out, err) -> None:
    os.dup2(out.detach(), 1)
    os.dup2(err.detach(), 2)


def _context():
    """``forkserver`` with :data:`PRELOAD` where there is no CUDA, else ``spawn``."""
    import torch

    if torch.cuda.is_available() or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))  # takes effect when the server starts (first use)
    return ctx


def _worker(rank: int, world_size: int, fn: Callable, args: tuple, kwargs: dict,
            queue, threads: int, env: dict[str, str], stdio: object = None) -> None:
    # stdio: a _CallerStdio, already applied while this process unpickled its arguments
    # The caller's whole environment, as a spawned process inherits it (a forked one would have the
    # fork server's, as it was when the server started).
    os.environ.clear()
    os.environ.update(env)
    import torch

    torch.set_num_threads(threads)
    try:
        from v2pe_megatron.runtime import distributed as rt

        with rt.process_group(backend="gloo"):
            result = fn(*args, **kwargs)
        # Plain pickle (by value): torch's queue pickler would hand tensors over through shared
        # memory, which needs this process alive until the parent has read them.
        try:
            blob = pickle.dumps(result)
        except Exception as e:  # a result that cannot travel is the test's bug: say so plainly
            raise TypeError(f"rank {rank} returned an unpicklable result: {e}") from e
        queue.put(_Outcome(rank, True, blob))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        queue.put(_Outcome(rank, False, traceback.format_exc()))


_SECONDARY = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out waiting",
              "NCCL communicator was aborted")


def _is_secondary(tb: str) -> bool:
    """A rank that failed only because a peer went away."""
    return any(s in tb for s in _SECONDARY)


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0,
                    threads_per_rank: int = 1, env: dict[str, str] | None = None, **kwargs: Any) -> list[Any]:
    """Call ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return the results ordered by rank.

    ``fn`` must be importable (module level) since ranks are spawned. Inside it the default process
    group exists; megatron's model-parallel state is the function's to set up (see
    ``v2pe_megatron.runtime.distributed.model_parallel``). The rendezvous store lives in this
    process on a port the OS assigned (``runtime.launch``), so concurrent groups never collide.
    """
    from v2pe_megatron.runtime.launch import host_store, rank_env

    if "PYTEST_CURRENT_TEST" in os.environ and "V2PE_TEST_MARKED_SLOW" not in os.environ:
        raise DistributedTestError("a test that starts ranks must be marked @pytest.mark.slow (tests/conftest.py), "
                                   "so that `-m 'not slow'` stays the quick loop")
    store = host_store(world_size)
    # Non-daemonic: megatron's checkpoint writer starts helper processes of its own.
    ctx = _context()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world_size, fn, args, kwargs, queue, threads_per_rank,
                                                {**os.environ, **(env or {}), **rank_env(store, r, world_size)},
                                                _CallerStdio()), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes: dict[int, _Outcome] = {}
    deadline = time.monotonic() + timeout
    failure: _Outcome | None = None
    try:
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outcomes))
                raise DistributedTestError(f"timed out after {timeout:.0f}s waiting for ranks {missing}")
            try:
                out = queue.get(timeout=min(remaining, 1.0))
            except Exception:  # queue.Empty: check whether a rank died without reporting
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcomes]
                if dead:
                    time.sleep(0.5)  # let a last report arrive
                    while not queue.empty():
                        o = queue.get()
                        outcomes[o.rank] = o
                    if any(r not in outcomes for r in dead):
                        raise DistributedTestError(
                            f"rank(s) {dead} died with exit code(s) {[procs[r].exitcode for r in dead]} "
                            "without a traceback (killed, out of memory, or a segfault)")
                continue
            outcomes[out.rank] = out
            if not out.ok:
                # One rank's error usually makes its peers fail in a collective a moment later:
                # gather what arrives shortly and report the root cause first.
                grace = time.monotonic() + 3.0
                while len(outcomes) < world_size and time.monotonic() < grace:
                    try:
                        o = queue.get(timeout=0.2)
                        outcomes[o.rank] = o
                    except Exception:  # queue.Empty
                        pass
                failed = [o for o in outcomes.values() if not o.ok]
                failed.sort(key=lambda o: (_is_secondary(o.payload), o.rank))
                failure = failed[0]
                others = [o.rank for o in failed[1:]]
                if others:
                    failure = _Outcome(failure.rank, False, failure.payload +
                                       f"\n(ranks {others} failed too, most likely as a consequence)")
                break
    finally:
        if failure is not None or len(outcomes) < world_size:
            for p in procs:
                if p.is_alive():
                    p.kill()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if failure is not None:
        raise DistributedTestError(f"rank {failure.rank} of {world_size} failed:\n{failure.payload}")
    return [pickle.loads(outcomes[r].payload) for r in range(world_size)]
