"""``v2pe-train`` against a real ``mlflow server`` on 127.0.0.1 (started here, stopped by PID), an
unreachable one, and one killed mid-run: the run is recorded when the server is there, and training
neither stalls nor dies when it is not. Slow: subprocesses (server, 2 ranks)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MLFLOW = str(Path(sys.executable).with_name("mlflow"))

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen(
        [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{workdir / 'server.db'}",
         "--artifacts-destination", str(workdir / "artifacts")],
        cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(workdir / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    raise RuntimeError("mlflow server did not answer /health within 120 s")


def _stop(proc: subprocess.Popen) -> None:
    # The server's workers are its children, in the session it leads: its PID is their group id.
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server_proc(tmp_path_factory):
    """One server for the module (~10-20 s to start). The test that kills it comes last in the file."""
    proc, uri = _start_server(tmp_path_factory.mktemp("mlflow-server"))
    yield proc, uri
    _stop(proc)


@pytest.fixture
def server(server_proc):
    proc, uri = server_proc
    if proc.poll() is not None:
        pytest.skip("the module's mlflow server was stopped by an earlier test")
    return uri


def _cmd(uri: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "v2pe_megatron.cli.train", str(ROOT / "recipes/tiny_cpu.yaml"),
            f"tracking.tracking_uri={uri}", "tracking.system_metrics=false", "data.seq_length=128", *overrides]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    return dict(env, PYTHONUNBUFFERED="1")


def _step_times(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"step \d+/\d+  loss .*?step ([0-9.]+)s", out)]


def test_run_against_a_server_has_params_tags_artifact_and_finishes(server, tmp_path):
    r = subprocess.run(_cmd(server, "train.steps=3"), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=server)
    run_id = re.search(r"MLflow run (\w+) in ", r.stdout).group(1)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "3" and run.data.params["parallel.tp"] == "1"
    tags = run.data.tags
    assert tags["layout"] == "tp=1 pp=1 cp=1 dp=2" and tags["world_size"] == "2"
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", tags["git_commit"]) and tags["device"].startswith("CPU: ")
    assert [h.step for h in c.get_metric_history(run_id, "loss")] == [1, 2, 3]
    assert "memory/rss_gb" in run.data.metrics and "step_time_s" in run.data.metrics
    assert "steps: 3" in open(c.download_artifacts(run_id, "recipe.yaml", str(tmp_path))).read()
    # Library noise silenced at its source; one console line per step.
    for noise in ("Transformer Engine and Apex", "absl", "Rewrapping ModuleSpec", "MimoModelConfig",
                  "No CUDA runtime", "full scope is deprecated", "not reachable"):
        assert noise not in out, noise
    assert len(re.findall(r"step \d+/3  loss", out)) == 3


def test_unreachable_server_costs_seconds_and_training_finishes(tmp_path):
    t0 = time.monotonic()
    r = subprocess.run(_cmd("http://127.0.0.1:9", "train.steps=3"), cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert len(re.findall(r"is not reachable", out)) == 1 and "Retrying" not in out
    assert "ran steps 1..3" in r.stdout
    # A run of this size takes ~15 s here; MLflow's own retry defaults made it 4 min 19 s, then die.
    assert wall < 90, wall
    lines = [json.loads(x) for x in (tmp_path / "runs/tiny_cpu/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    gave_up = float(re.search(r"gave up after ([0-9.]+)s", out).group(1))
    assert gave_up < 15, gave_up
    print(f"unreachable tracking server: tracker gave up after {gave_up}s, whole run {wall:.1f}s")


def test_a_cli_run_that_dies_before_its_first_checkpoint_ends_failed(tmp_path):
    # Before: such runs stayed RUNNING in MLflow forever.
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"id": i, "image": "gone.png", "conversations": conv})
                                              + "\n" for i in range(4)))
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"annotation": "d.jsonl"}}))
    cmd = [sys.executable, "-m", "v2pe_megatron.cli.train", str(ROOT / "recipes/tiny_cpu.yaml"), "--nproc", "1",
           "tracking.system_metrics=false", f"data.meta_path={tmp_path / 'meta.json'}",
           f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.save_interval=1"]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "no usable sample" in r.stderr, r.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs/tiny_cpu/mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("v2pe-megatron").experiment_id])
    assert [x.info.status for x in runs] == ["FAILED"]


class _LateServer:
    """What a client sees of a server that comes up later: connections to ``port`` are refused until
    :meth:`up`, then forwarded to the real server (the module's, already running)."""

    def __init__(self, target: str) -> None:
        import threading

        self.target = target.removeprefix("http://").split(":")
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._sock: socket.socket | None = None
        self._threading = threading

    def up(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self._sock is not None:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.target[0], int(self.target[1])))
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def test_a_server_that_comes_up_mid_run_gets_the_run_and_every_step(server, tmp_path):
    # Before: MLflow down at the start meant no MLflow run at all, even once the server was up.
    late = _LateServer(server)
    steps, run = 6, None
    try:
        run = subprocess.Popen(_cmd(late.uri, f"train.steps={steps}", "tracking.retry_interval_s=1"), cwd=tmp_path,
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in run.stdout:
            lines.append(line)
            if late._sock is None and re.search(r"step 2/\d+  loss", line):
                late.up()
        run.wait(timeout=60)
    finally:
        late.close()
        if run is not None and run.poll() is None:
            run.kill()
    out = "".join(lines)
    assert run.returncode == 0, out[-3000:]
    assert len(re.findall(r"is not reachable", out)) == 1 and "created; sending the steps" in out
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=server)
    run_id = re.search(r"MLflow run (\w+) in ", out).group(1)
    got = c.get_run(run_id)
    assert got.info.status == "FINISHED" and got.data.params["train.steps"] == str(steps)
    assert got.data.tags["world_size"] == "2"
    assert [h.step for h in c.get_metric_history(run_id, "loss")] == list(range(1, steps + 1))
    logged = [json.loads(x) for x in (tmp_path / "runs/tiny_cpu/metrics.jsonl").read_text().splitlines()]
    assert [h.value for h in c.get_metric_history(run_id, "loss")] == [x["loss"] for x in logged]
    # the steps logged before the run existed say so; the run id is known from its creation on
    assert logged[0]["run_id"] is None and {x["run_id"] for x in logged} <= {None, run_id}


@pytest.mark.parametrize("how", ["hung", "killed"])  # "killed" last: it stops the module's server
def test_server_killed_or_hung_mid_run_neither_stalls_nor_kills_training(server_proc, tmp_path, how):
    proc, uri = server_proc
    if proc.poll() is not None:
        pytest.skip("the module's mlflow server was stopped by an earlier test")
    steps = 30
    run = None
    try:
        t0 = time.monotonic()
        run = subprocess.Popen(_cmd(uri, f"train.steps={steps}"), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        lines, killed_at = [], None
        for line in run.stdout:
            lines.append(line)
            if killed_at is None and re.search(r"step 3/\d+  loss", line):
                if how == "killed":
                    _stop(proc)
                else:  # still accepts connections, never answers: every request runs into its timeout
                    os.killpg(proc.pid, signal.SIGSTOP)
                killed_at = time.monotonic()
        run.wait(timeout=60)
    finally:
        if how == "hung":
            os.killpg(proc.pid, signal.SIGCONT)
        else:
            _stop(proc)
        if run is not None and run.poll() is None:
            run.kill()
    out = "".join(lines)
    assert run.returncode == 0, out[-3000:]
    assert killed_at is not None
    after_kill = time.monotonic() - killed_at
    times = _step_times(out)
    assert len(times) == steps
    # Before: MLflow stalled the step loop for 8 minutes, then the run died unsaved.
    assert max(times[3:]) < max(5.0, 10 * sorted(times)[len(times) // 2]), times
    assert after_kill < 90, after_kill
    lines = [json.loads(x) for x in (tmp_path / "runs/tiny_cpu/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, steps + 1))
    print(f"server {how} after step 3: {after_kill:.1f}s to the end of the run, "
          f"step times before {times[:3]}, max after {max(times[3:]):.3f}s, whole run {time.monotonic() - t0:.1f}s")
