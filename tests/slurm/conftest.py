"""A real single-node Slurm cluster for the tests of ``slurm/*.sbatch``.

Debian's ``slurm-wlm`` is installed with apt when it is missing (the tests skip, saying why, only
where there is no apt-get or no root to run it). ``slurmctld`` and ``slurmd`` run without munge from
``slurm.conf.in`` in a temporary folder, on ports the OS reports free, and are stopped by their PIDs
at the end of the session (after every job of the cluster is cancelled and gone).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


def _install_slurm() -> None:
    if all(shutil.which(t) for t in TOOLS):
        return
    if shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and this machine has no apt-get to install Debian's slurm-wlm")
    if os.geteuid() != 0:
        pytest.skip("Slurm is not installed, and installing slurm-wlm with apt-get (and running its "
                    "daemons) needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm"]
    print("installing Slurm:", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"apt-get install slurm-wlm failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    missing = [t for t in TOOLS if not shutil.which(t)]
    assert not missing, f"slurm-wlm installed but {missing} not on PATH"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """The running test cluster; ``env`` is what a user's shell would have (SLURM_CONF, the project's
    Python for the jobs)."""

    folder: Path
    env: dict[str, str]
    daemons: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *cmd: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, cwd=cwd, env=env or self.env, capture_output=True, text=True, timeout=60)
        assert not check or r.returncode == 0, f"{' '.join(cmd)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        return self.run("sbatch", "--parsable", *args, cwd=cwd, env=env).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, StdOut, ...)."""
        out = self.run("scontrol", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, states=FINAL, timeout: float = 300.0) -> dict[str, str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            time.sleep(1.0)
        raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: {self.job(job_id)}\n"
                             f"{self.output(job_id)[-4000:]}")

    def output(self, job_id: str) -> str:
        path = Path(self.job(job_id)["StdOut"])
        return path.read_text(errors="replace") if path.is_file() else ""

    def log(self, name: str) -> str:
        p = self.folder / "log" / name
        return p.read_text(errors="replace")[-3000:] if p.is_file() else ""

    def stop(self) -> None:
        jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            self.run("scancel", *jobs, check=False)
            end = time.monotonic() + 60
            while time.monotonic() < end and self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                time.sleep(1.0)
        for p in reversed(self.daemons):  # slurmd first, then slurmctld
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    _install_slurm()
    folder = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "run", "log"):
        (folder / sub).mkdir()
    conf = (Path(__file__).with_name("slurm.conf.in").read_text()
            .replace("@STATE@", str(folder)).replace("@CTLD_PORT@", str(_free_port()))
            .replace("@SLURMD_PORT@", str(_free_port())).replace("@CPUS@", str(max(2, os.cpu_count() or 2))))
    (folder / "slurm.conf").write_text(conf)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env.update(SLURM_CONF=str(folder / "slurm.conf"), V2PE_PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    cluster = Cluster(folder, env)
    try:
        for cmd, log in ((["slurmctld", "-D", "-i"], "slurmctld.out"), (["slurmd", "-D", "-N", "localhost"], "slurmd.out")):
            with open(folder / "log" / log, "w") as f:
                cluster.daemons.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT))
        end = time.monotonic() + 60
        while cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() != "idle":
            dead = [p.args[0] for p in cluster.daemons if p.poll() is not None]
            if dead or time.monotonic() > end:
                raise AssertionError(f"the test cluster did not come up (exited: {dead}):\n"
                                     f"{cluster.log('slurmctld.log')}\n{cluster.log('slurmd.log')}\n"
                                     f"{cluster.log('slurmctld.out')}\n{cluster.log('slurmd.out')}")
            time.sleep(0.5)
        yield cluster
    finally:
        cluster.stop()
