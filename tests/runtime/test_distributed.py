"""Launch environment (torchrun, Slurm), backend choice and the multi-rank harness."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest
import torch

from v2pe_megatron.runtime.distributed import choose_backend, expand_slurm_nodelist, read_launch_env
from v2pe_megatron.testing.distributed import DistributedTestError, run_distributed


def test_torchrun_env():
    le = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                          "MASTER_PORT": "1234"})
    assert (le.rank, le.world_size, le.local_rank, le.master_addr, le.master_port, le.source) == \
        (3, 8, 1, "n1", 1234, "torchrun")


def test_slurm_env_master_from_nodelist():
    le = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                          "SLURM_JOB_NODELIST": "gpu-[07-08,11],cpu1", "SLURM_JOB_ID": "4242"})
    assert (le.rank, le.world_size, le.local_rank, le.master_addr, le.source) == (5, 16, 1, "gpu-07", "slurm")
    assert le.master_port == 20000 + 4242


def test_torchrun_wins_over_slurm():
    le = read_launch_env({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"})
    assert le.source == "torchrun" and le.world_size == 2


def test_single_process_default():
    le = read_launch_env({})
    assert (le.rank, le.world_size, le.source, le.master_port) == (0, 1, "single", 0)  # 0: the OS assigns one
    assert read_launch_env({"MASTER_PORT": "1234"}).master_port == 1234


def _listening(port: int) -> socket.socket | None:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:  # taken already: the same situation
        s.close()
        return None
    s.listen()
    return s


def test_single_process_groups_do_not_share_a_port():
    # Another single-rank run or evaluation on this machine holds torch's default port 29500.
    import torch.distributed as dist

    from v2pe_megatron.runtime.distributed import process_group

    other = _listening(29500)
    try:
        with process_group("gloo", environ={}):
            t = torch.ones(1)
            dist.all_reduce(t)
            assert t.item() == 1.0
    finally:
        if other:
            other.close()


def test_single_process_group_uses_master_port_when_set():
    from v2pe_megatron.runtime.distributed import process_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with process_group("gloo", environ={"MASTER_PORT": str(port)}):
        assert _listening(port) is None  # the rendezvous holds the port the user (or srun) gave


@pytest.mark.parametrize("nodelist,hosts", [
    ("node01", ["node01"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("a[001-002,010],b7", ["a001", "a002", "a010", "b7"]),
    ("x[9-11]-ib", ["x9-ib", "x10-ib", "x11-ib"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


def test_backend_choice():
    assert choose_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    assert choose_backend("gloo") == "gloo"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA"):
            choose_backend("nccl")


def _allreduce_rank() -> dict:
    import torch.distributed as dist

    from v2pe_megatron.runtime import cpu_compat

    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return {"sum": t.item(), "rank": dist.get_rank(), "cpu_compat": cpu_compat.is_active(),
            "backend": dist.get_backend()}


def _fail_on_rank_one():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank one is broken on purpose")
    dist.barrier()  # rank 0 would wait forever: the harness must stop it


def _sleep_forever():
    time.sleep(3600)


@pytest.mark.slow
def test_harness_runs_ranks_and_collects_results():
    out = run_distributed(_allreduce_rank, 3)
    assert [o["rank"] for o in out] == [0, 1, 2]
    assert all(o["sum"] == 6.0 and o["backend"] == "gloo" for o in out)
    assert all(o["cpu_compat"] == (not torch.cuda.is_available()) for o in out)


@pytest.mark.slow
def test_harness_shows_failing_rank_traceback():
    t0 = time.monotonic()
    with pytest.raises(DistributedTestError, match="rank 1 of 2 failed") as e:
        run_distributed(_fail_on_rank_one, 2, timeout=120)
    assert "rank one is broken on purpose" in str(e.value)
    assert "_fail_on_rank_one" in str(e.value)
    assert time.monotonic() - t0 < 100


@pytest.mark.slow
def test_harness_times_out():
    with pytest.raises(DistributedTestError, match="timed out"):
        run_distributed(_sleep_forever, 1, timeout=5)


def _speak(word: str) -> str | None:
    import torch.distributed as dist

    if word:
        print(f"rank {dist.get_rank()} says {word}", flush=True)
        print(f"rank {dist.get_rank()} warns {word}", file=sys.stderr, flush=True)
    return os.environ.get("V2PE_TEST_CALLER_VAR")


@pytest.mark.slow
def test_ranks_get_the_callers_environment_and_stdout_at_start(capfd, monkeypatch):
    """As spawned ranks do, also when forked from a fork server started earlier: the server may
    predate the variable, and its stdout/stderr are those of whatever started it."""
    with capfd.disabled():  # the first group may start the server, outside this test's capture
        assert run_distributed(_speak, 1, "") == [None]
    monkeypatch.setenv("V2PE_TEST_CALLER_VAR", "set after the server started")
    assert run_distributed(_speak, 2, "hello") == ["set after the server started"] * 2
    out, err = capfd.readouterr()
    assert "rank 0 says hello" in out and "rank 1 says hello" in out, (out, err)
    assert "rank 1 warns hello" in err


@pytest.mark.gpu
def test_nccl_backend_on_gpu():
    assert choose_backend("auto") == "nccl"
    assert os.environ.get("CUDA_VISIBLE_DEVICES", "0") != ""


@pytest.mark.slow
def test_local_launcher_ranks_meet_and_failures_stop_the_rest(tmp_path):
    from v2pe_megatron.runtime.launch import run_local

    script = tmp_path / "worker.py"
    script.write_text(
        "import os, sys, time\n"
        "import torch.distributed as dist\n"
        "dist.init_process_group('gloo', init_method=f\"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}\",\n"
        "                        rank=int(os.environ['RANK']), world_size=int(os.environ['WORLD_SIZE']))\n"
        "open(os.path.join(sys.argv[1], f\"rank{dist.get_rank()}\"), 'w').write(str(dist.get_world_size()))\n"
        "dist.barrier()\n"
        "if dist.get_rank() == 1 and sys.argv[2] == 'fail':\n"
        "    sys.exit(3)\n"
        "time.sleep(0 if sys.argv[2] == 'ok' else 120)\n")
    assert run_local([str(script), str(tmp_path), "ok"], 2) == 0
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0", "rank1"]
    t0 = time.monotonic()
    assert run_local([str(script), str(tmp_path), "fail"], 2) == 3
    assert time.monotonic() - t0 < 60  # rank 0 was stopped, not waited for


def _seeded_draws(seed: int, scramble: int) -> dict:
    """What a model built right after ``initialize_model_parallel(seed)`` would draw on the CPU."""
    import random

    import numpy as np

    from v2pe_megatron.model.vision import VisionEmbeddings
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing import tiny

    # Generators left in some other state by earlier work: what follows must not depend on it.
    torch.manual_seed(scramble)
    random.seed(scramble)
    np.random.seed(scramble)
    with model_parallel(seed=seed):
        initial = torch.initial_seed()
        emb = VisionEmbeddings(tiny.tiny_recipe().model.vision, torch.float32)
        return {"initial_seed": initial, "params": torch.cat([p.detach().flatten() for p in emb.parameters()]),
                "randn": torch.randn(4), "random": random.random(), "numpy": float(np.random.rand())}


def test_seed_reaches_cpu_initialised_parameters_when_megatron_seeds_only_cuda(monkeypatch):
    """On a GPU, megatron's model_parallel_cuda_manual_seed touches CUDA generators only; InternViT's
    class/position embeddings and patch conv are made on the CPU and must still follow train.seed."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    seen: list[int] = []
    monkeypatch.setattr(tensor_parallel, "model_parallel_cuda_manual_seed", lambda seed, *a, **k: seen.append(seed))
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        a = _seeded_draws(5, scramble=111)
        b = _seeded_draws(5, scramble=222)
        c = _seeded_draws(6, scramble=111)
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])
    assert seen == [5, 5, 6]  # megatron is still asked to seed its tracker
    assert (a["initial_seed"], c["initial_seed"]) == (5, 6)
    for key in ("params", "randn"):
        assert torch.equal(a[key], b[key]), key
        assert not torch.equal(a[key], c[key]), key
    for key in ("random", "numpy"):
        assert a[key] == b[key] and a[key] != c[key], key


def _launched_env(tmp_path, env: dict) -> list[dict]:
    """What ``run_local`` hands its 2 ranks: each writes the variables the launcher defaults."""
    import json

    from v2pe_megatron.runtime.launch import RANK_ENV_DEFAULTS, run_local

    script = tmp_path / "env.py"
    script.write_text("import json, os, sys\n"
                      f"keys = {sorted(RANK_ENV_DEFAULTS)!r}\n"
                      "open(os.path.join(sys.argv[1], 'rank' + os.environ['RANK']), 'w').write(\n"
                      "    json.dumps({k: os.environ.get(k) for k in keys}))\n")
    assert run_local([str(script), str(tmp_path)], 2, env={"PATH": "/usr/bin:/bin", **env}) == 0
    return [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(2)]


@pytest.mark.slow  # starts processes
def test_local_launcher_sets_cuda_device_max_connections_unless_the_user_did(tmp_path):
    """megatron-core's TP/CP communication overlap needs CUDA_DEVICE_MAX_CONNECTIONS=1 before CUDA
    initializes, as slurm/job.sh exports it for srun; the self-launcher puts it in every rank's
    environment, and a value the user set wins."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert _launched_env(tmp_path / "a", {}) == [{"CUDA_DEVICE_MAX_CONNECTIONS": "1", "OMP_NUM_THREADS": "1"}] * 2
    mine = {"CUDA_DEVICE_MAX_CONNECTIONS": "8", "OMP_NUM_THREADS": "4"}
    assert _launched_env(tmp_path / "b", mine) == [mine] * 2


def test_a_failed_rank_is_named_with_its_pid_and_signal():
    from v2pe_megatron.runtime.launch import describe_failure

    killed = describe_failure(1, 4242, -9)
    assert killed.startswith("rank 1 (pid 4242) was killed by SIGKILL (exit code 137): ")
    assert "out-of-memory killer" in killed and "dmesg" in killed and "MaxRSS" in killed
    assert "native code" in describe_failure(0, 7, -11) and "SIGSEGV" in describe_failure(0, 7, -11)
    assert describe_failure(2, 7, 3) == "rank 2 (pid 7) exited with code 3: its messages above say why"


@pytest.mark.slow
def test_local_launcher_names_a_killed_rank_and_stops_the_others_promptly(tmp_path, capfd, monkeypatch):
    from v2pe_megatron.runtime import launch

    monkeypatch.setattr(launch, "FAIL_GRACE_S", 2.0)

    script = tmp_path / "worker.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "import torch.distributed as dist\n"
        "dist.init_process_group('gloo', init_method=f\"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}\",\n"
        "                        rank=int(os.environ['RANK']), world_size=int(os.environ['WORLD_SIZE']))\n"
        "open(os.path.join(sys.argv[1], f\"pid{dist.get_rank()}\"), 'w').write(str(os.getpid()))\n"
        "dist.barrier()\n"
        "if dist.get_rank() == 1:\n"
        "    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer does\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a rank stuck where SIGTERM cannot stop it\n"
        "time.sleep(120)\n")
    t0 = time.monotonic()
    assert launch.run_local([str(script), str(tmp_path)], 2) == 128 + 9
    assert time.monotonic() - t0 < 30  # the other rank was killed after the grace, not waited for (120 s)
    err = capfd.readouterr().err
    pid = (tmp_path / "pid1").read_text()
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"v2pe: rank 1 (pid {pid}) was killed by SIGKILL (exit code 137)"), err[-2000:]
    assert "out-of-memory killer" in last and last.endswith("the other ranks were stopped")
