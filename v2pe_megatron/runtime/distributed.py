"""Distributed start-up and teardown: torchrun or Slurm environment, NCCL or gloo, megatron state.

The same code path serves a laptop CPU (gloo, with :mod:`v2pe_megatron.runtime.cpu_compat`
active) and a GPU cluster (NCCL). Nothing here builds models or reads data.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import weakref
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, read from torchrun's or Slurm's variables."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single"


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """``node[01-03,7],gpu-a`` -> ``['node01', 'node02', 'node03', 'node7', 'gpu-a']``.

    ``scontrol show hostnames`` does this too, but it is not on the compute image everywhere and the
    master address must be known before any process group exists.
    """
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for rng in ranges.split(","):
            if "-" in rng:
                lo, hi = rng.split("-", 1)
                width = len(lo)
                hosts += [f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(f"{prefix}{rng}{suffix}")
    return hosts


def read_launch_env(environ: Optional[dict[str, str]] = None, default_port: int = 29500) -> LaunchEnv:
    """torchrun's RANK/WORLD_SIZE win; then Slurm's SLURM_PROCID/SLURM_NTASKS; else one process.

    ``master_port`` 0 means "none given": a single process (not under torchrun or Slurm, no
    ``MASTER_PORT``) hosts its own rendezvous on a port the OS assigns (:func:`process_group`)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", default_port)),
                         "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodes = expand_slurm_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1")
        # A per-job port keeps two jobs sharing a node apart.
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         env.get("MASTER_ADDR") or nodes[0], port, "slurm")
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or 0), "single")


def choose_backend(requested: str = "auto") -> str:
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("launcher.backend=nccl needs CUDA, and none is available: use launcher.backend=auto "
                           "(gloo without CUDA) or gloo")
    return requested


def on_cpu() -> bool:
    return not torch.cuda.is_available()


@contextlib.contextmanager
def process_group(backend: str = "auto", timeout_minutes: float = 10.0,
                  environ: Optional[dict[str, str]] = None,
                  store: Optional[dist.Store] = None) -> Iterator[LaunchEnv]:
    """Initialize the default process group (and the CPU compatibility layer on CPU); tear down after.

    Rendezvous: ``store`` if given, else ``tcp://MASTER_ADDR:MASTER_PORT`` (a client of the
    launcher's store when ``TORCHELASTIC_USE_AGENT_STORE=True``, as under torchrun and
    ``runtime.launch``). A single process with no ``MASTER_PORT`` hosts its own store on a port the
    OS assigns (bound, not chosen and bound later): any number of single-rank runs and evaluations
    share a machine. Re-entrant: if a group already exists it is used as is and left alone.
    """
    if dist.is_initialized():
        yield read_launch_env(environ)
        return
    le = read_launch_env(environ)
    backend = choose_backend(backend)
    if backend == "gloo" and on_cpu():
        from v2pe_megatron.runtime import cpu_compat

        cpu_compat.activate()
    if backend == "nccl":
        torch.cuda.set_device(le.local_rank % torch.cuda.device_count())
    timeout = _dt.timedelta(minutes=timeout_minutes)
    if store is None and le.source == "single" and not le.master_port:
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False, timeout=timeout)
    if store is not None:
        dist.init_process_group(backend=backend, store=store, rank=le.rank, world_size=le.world_size,
                                timeout=timeout)
    else:
        dist.init_process_group(backend=backend, init_method=f"tcp://{le.master_addr}:{le.master_port}",
                                rank=le.rank, world_size=le.world_size, timeout=timeout)
    try:
        yield le
    finally:
        destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def initialize_model_parallel(tp: int = 1, pp: int = 1, cp: int = 1, *, seed: int = 1234,
                              hierarchical_cp_sizes: Optional[list[int]] = None,
                              timeout_minutes: float = 10.0, vpp: int = 1) -> None:
    """megatron-core parallel state (order tp-cp-dp-pp), the model-parallel RNG tracker and the
    process-wide generators (torch CPU, python, numpy), all from ``seed``."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
        hierarchical_context_parallel_sizes=list(hierarchical_cp_sizes) if hierarchical_cp_sizes else None,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        distributed_timeout_minutes=int(max(1, timeout_minutes)))
    seed_all(seed)


def seed_all(seed: int) -> None:
    """Seed every generator a rank draws from: python, numpy, torch (CPU and CUDA) and megatron's
    tensor-parallel RNG tracker (its states differ by TP rank). Needs megatron's parallel state."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    # megatron's call seeds CUDA generators only: on a GPU, parameters made on the CPU (the vision
    # embeddings, the patch conv) would otherwise ignore the seed. Before it, because torch.manual_seed
    # seeds CUDA too and megatron's CUDA seeds must be the ones that stay.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


@contextlib.contextmanager
def model_parallel(tp: int = 1, pp: int = 1, cp: int = 1, *, seed: int = 1234,
                   hierarchical_cp_sizes: Optional[list[int]] = None) -> Iterator[None]:
    """``with model_parallel(tp=2): ...`` inside an existing process group (e.g. in a test rank).

    With no process group at all (a single plain process), a 1-rank group is made (on a store bound
    to a port the OS assigns) and destroyed afterwards, so single-process code paths run the same
    megatron-core layers.
    """
    with contextlib.ExitStack() as stack:
        if not dist.is_initialized():
            store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
            stack.enter_context(process_group(environ={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"},
                                              store=store))
        initialize_model_parallel(tp, pp, cp, seed=seed, hierarchical_cp_sizes=hierarchical_cp_sizes)
        try:
            yield
        finally:
            destroy_model_parallel()


def standalone_model_parallel(what: str, tp: int = 1, pp: int = 1, cp: int = 1) -> Optional[contextlib.ExitStack]:
    """megatron state for a plain script: ``None`` when it exists already (a training rank, a test
    rank, a caller's ``model_parallel``), else megatron state with tp = pp = cp = 1 (in a 1-rank
    process group made for it when there is none), open in the returned stack (close it, or hand it
    to :func:`release_with`).

    Model parallelism needs its ranks and a layout of them that the caller decides: for tp, pp or cp
    > 1 the message says how to set it up. ``what`` names the caller in it."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return None
    if tp * pp * cp > 1:
        raise RuntimeError(
            f"{what}: the layout has tp={tp} pp={pp} cp={cp} ({tp * pp * cp} model-parallel ranks) but megatron's "
            f"parallel state is not initialized. Start the ranks (torchrun, srun) and call "
            f"v2pe_megatron.runtime.distributed.initialize_model_parallel({tp}, {pp}, {cp}) in each before "
            f"building the model; only a layout with tp=pp=cp=1 is set up here by itself")
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(model_parallel(1, 1, 1))
    except BaseException:
        stack.close()
        raise
    return stack


def release_with(obj: object, stack: contextlib.ExitStack) -> None:
    """Keep ``stack`` (a :func:`standalone_model_parallel` state) open as long as ``obj`` lives.

    Closed by a finalizer when ``obj`` is collected, at the latest at interpreter exit while ``obj``
    is still alive (before the interpreter tears its modules down, not from a garbage-collected
    generator afterwards: "Exception ignored in: <generator object model_parallel> ... ImportError:
    sys.meta_path is None"), or now by ``obj.release_process_group()``."""
    obj.release_process_group = weakref.finalize(obj, stack.close)


def device() -> torch.device:
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
