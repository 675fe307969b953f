"""Experiment tracking: MLflow on rank 0, nothing elsewhere; it never stops or stalls training.

With no ``tracking.tracking_uri`` the store is embedded: ``sqlite:///runs/<recipe>/mlflow.db`` with
artifacts under ``runs/<recipe>/mlruns`` (no server to run; ``mlflow ui --backend-store-uri`` on the
same URI shows it). Any server works via ``tracking.tracking_uri=http://host:port``. A resumed run
re-opens the same MLflow run (its id is kept in the checkpoint).

What a run records: the resolved recipe as params (new runs; MLflow params cannot change later), tags
(``git_commit`` of this project, ``layout``, ``device``, ``world_size``), the recipe YAML as the
artifact ``recipe.yaml``, per-step metrics (whatever the loop passes, plus ``memory/peak_allocated_gb``
on GPU or ``memory/rss_gb`` on CPU), and the final status FINISHED / KILLED / FAILED.

Why it cannot hurt the run:

- Every metric is first appended to ``runs/<recipe>/metrics.jsonl`` (one JSON object per step with
  the run id), on the training thread: a local file, microseconds. That file is the record whenever
  the server was unreachable.
- Talking to MLflow happens on one background thread behind a bounded queue. ``log_metrics`` never
  waits: when the queue is full (a slow server), the oldest unsent step is dropped from the upload
  (it is in the JSONL file).
- MLflow's REST client retries 7 times with exponential backoff and a 120 s timeout by default (4+
  minutes per call against a dead server). The tracker sets short defaults for this process
  (:data:`HTTP_DEFAULTS`; any ``MLFLOW_HTTP_REQUEST_*`` variable already set wins).
- The first failure prints one warning; while the server is down the thread only re-probes it every
  ``tracking.retry_interval_s`` seconds (default 30), and picks up again when it answers.
- ``close`` waits at most :data:`CLOSE_TIMEOUT_S` for the upload thread.

Nothing is lost to an outage: the JSONL file is the backlog. The worker remembers which bytes of it
(the lines this process wrote, by their offsets) it has not sent; when the server answers again it
sends those lines, in order, before anything newer, then the calls (artifacts) made meanwhile. A server that is down when the run starts (so no MLflow run exists
yet) is handled the same way: the worker keeps trying to start the run, at the same interval, and
once it is there it gets the params, tags and recipe, then every step logged meanwhile. Steps
logged before the run existed carry ``"run_id": null`` in the file; the run id is known from then on
(``Tracker.run_id``, read when a checkpoint is saved and when training ends).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from v2pe_megatron.config import Recipe, flatten, to_dict, to_yaml

log = logging.getLogger(__name__)

# MLflow REST client settings for this process: a dead server costs seconds, not minutes.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.2",
}
QUEUE_SIZE = 1000
CLOSE_TIMEOUT_S = 20.0
STATUSES = ("FINISHED", "KILLED", "FAILED")


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


def resolve_tracking_uri(recipe: Recipe) -> str:
    if recipe.tracking.tracking_uri:
        return recipe.tracking.tracking_uri
    d = default_run_dir(recipe).resolve()
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{d / 'mlflow.db'}"


def init_sqlite_store(uri: str) -> None:
    """Create a new embedded store atomically: MLflow builds a sqlite database by running its ~50
    schema migrations in place (seconds), and a rank killed meanwhile (the launcher stops the others
    when one rank fails early) left a half-migrated ``mlflow.db`` that every later run of the recipe
    failed on ("table _alembic_tmp_experiments already exists"). Build it under a temporary name, then
    rename."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):])
    if path.exists():
        return
    from mlflow.tracking import MlflowClient

    # A name never used before: MLflow caches stores (and their engines) by URI.
    tmp = path.with_name(f".{path.name}.init-{os.getpid()}-{time.time_ns()}")
    try:
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp}")  # runs the migrations
        store = client._tracking_client.store
        if hasattr(store, "engine"):
            store.engine.dispose()
        if not path.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Tags
# ---------------------------------------------------------------------------------------------
def git_commit(start: Path | None = None) -> str:
    """The commit checked out in the project's own git checkout (worktrees included), read from the
    files under ``.git``; ``git rev-parse`` (5 s timeout) if those are unusual; ``"unknown"`` when the
    package is not in a checkout (an installed wheel)."""
    root = Path(start or Path(__file__).resolve().parents[2])
    dot = root / ".git"
    try:
        if dot.is_file():  # a worktree or submodule: "gitdir: <path>"
            gitdir = Path(dot.read_text().split("gitdir:", 1)[1].strip())
            gitdir = gitdir if gitdir.is_absolute() else (root / gitdir)
        elif dot.is_dir():
            gitdir = dot
        else:
            return "unknown"
        common = gitdir
        if (gitdir / "commondir").is_file():
            c = Path((gitdir / "commondir").read_text().strip())
            common = c if c.is_absolute() else (gitdir / c)
        head = (gitdir / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head[4:].strip()
        for d in (gitdir, common):
            if (d / ref).is_file():
                return (d / ref).read_text().strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
    except (OSError, IndexError, UnicodeDecodeError):
        pass
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"GPU: {torch.cuda.get_device_name(torch.cuda.current_device())}"
    except Exception:  # a broken CUDA install must not stop tracking
        pass
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu or os.uname().machine} ({os.cpu_count()} cores)"


def memory_metrics() -> dict[str, float]:
    """This process's memory: peak allocated GPU memory, or the resident set size on CPU (GB)."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return {"memory/peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9}
    except Exception:
        pass
    try:
        import psutil

        return {"memory/rss_gb": psutil.Process().memory_info().rss / 1e9}
    except Exception:
        return {}


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
        return True
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise  # unreachable server and the like: the caller's warning


def _short_reason(err: BaseException) -> str:
    """'Connection refused' rather than MLflow's three-line wrapper of urllib3's exception."""
    text = str(err).strip()
    for pat in (r"\[Errno -?\d+\] [^\"')(]+", r"[Rr]ead timed out[^\"')]*", r"timed out", r"Max retries exceeded"):
        m = re.search(pat, text)
        if m:
            return m.group(0).strip()
    return (text.splitlines()[0][:200] if text else type(err).__name__)


class _DropMlflowRetries(logging.Filter):
    """urllib3 logs one warning per retry of MLflow's REST calls; the tracker's own warning says it
    once."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Retrying") and "/api/2.0/mlflow" in msg)


def exit_status(status: str) -> str:
    """``status`` unless an exception is being raised through the caller (``close`` called from a
    ``finally``): Ctrl-C is KILLED, any other exception FAILED."""
    exc = sys.exc_info()[1]
    if exc is None or status == "KILLED":
        return status
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED"
    if isinstance(exc, SystemExit) and exc.code in (0, None):
        return status
    return "FAILED"


_retry_filter: Optional[logging.Filter] = None


def _quiet_retries() -> None:
    global _retry_filter
    if _retry_filter is None:
        _retry_filter = _DropMlflowRetries()
        logging.getLogger("urllib3.connectionpool").addFilter(_retry_filter)


# ---------------------------------------------------------------------------------------------
# Tracker
# ---------------------------------------------------------------------------------------------
class Tracker:
    """No-op unless ``active`` (rank 0 with tracking.backend=mlflow).

    ``tags`` are added to the run's tags (the loop passes ``layout`` and ``world_size``)."""

    def __init__(self, recipe: Recipe, *, active: bool, run_id: Optional[str] = None,
                 tags: Optional[dict[str, Any]] = None):
        self.active = active and recipe.tracking.backend == "mlflow"
        self.run_id: Optional[str] = run_id if self.active else None
        self.uri: Optional[str] = None
        self.local_path: Optional[Path] = None
        self.dropped = 0          # steps not uploaded because the queue was full
        self.online = False       # the server answered the last call
        self.started = False      # the MLflow run exists and has its params, tags and recipe
        self.replayed = 0         # steps sent from metrics.jsonl after an outage
        self._warned = False
        self._last_try = 0.0
        self._closed = False
        self._local_failed = False
        self._monitor = None
        self._client = None
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
        self._thread: Optional[threading.Thread] = None
        if not self.active:
            return
        for k, v in HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
        _quiet_retries()
        run_dir = default_run_dir(recipe)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.local_path = (run_dir / "metrics.jsonl").resolve()
        # Binary and unbuffered: one write per line, at offsets the worker can re-read (taken after
        # each write, so another process appending to the same file does not shift them).
        self._local = open(self.local_path, "ab", buffering=0)
        self._backlog: list[list[int]] = []  # worker only: [start, end) ranges of our unsent lines
        self._pending: list[Callable[[], None]] = []  # worker only: calls made while offline
        self._created = False     # this tracker created the run (so it sends the params)
        self.uri = resolve_tracking_uri(recipe)
        self._recipe = recipe
        tags = {"git_commit": git_commit(), "device": device_name(), **(tags or {})}
        tags["mlflow.source.git.commit"] = tags["git_commit"]
        self._tags = tags
        t0 = time.time()
        try:
            describe = self._start_run()
            # on the worker: the first step does not wait for these uploads
            self._queue.put(("call", describe))
            self.online = self.started = True
        except Exception as e:  # noqa: BLE001 - whatever MLflow raises, training goes on
            self._warn(e, f"gave up after {time.time() - t0:.1f}s")
        self._thread = threading.Thread(target=self._work, name="v2pe-mlflow", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)

    # -- MLflow calls (start on the caller's thread, everything else on the worker) -------------
    def _start_run(self) -> Callable[[], None]:
        """Create (or reopen) the run; returns the call that sends its params, tags and recipe. Runs
        on the caller's thread at start, then on the worker until it succeeds."""
        from mlflow.tracking import MlflowClient

        recipe, run_id, tags = self._recipe, self.run_id, self._tags
        init_sqlite_store(self.uri)
        self._client = client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None and not self._created and not _run_exists(client, run_id):
            log.warning("MLflow run %s (from the checkpoint) is not in %s: starting a new run", run_id, self.uri)
            run_id = self.run_id = None
        if run_id is None:
            exp = client.get_experiment_by_name(recipe.tracking.experiment)
            if exp is not None:
                exp_id = exp.experiment_id
            else:
                local = not self.uri.startswith(("http://", "https://", "databricks"))
                artifacts = (default_run_dir(recipe) / "mlruns").resolve().as_uri() if local else None
                exp_id = client.create_experiment(recipe.tracking.experiment, artifact_location=artifacts)
            run = client.create_run(exp_id, run_name=recipe.tracking.run_name or recipe.name)
            self.run_id, self._created = run.info.run_id, True
        elif not self._created:
            client.update_run(run_id, status="RUNNING")
        # params are immutable in MLflow: a resumed run keeps the first job's
        params = {k: str(v)[:500] for k, v in flatten(to_dict(recipe)).items()} if self._created else {}
        from mlflow.entities import Param, RunTag

        run, text = self.run_id, to_yaml(recipe)

        def describe() -> None:
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                client.log_batch(run, params=[Param(k, v) for k, v in items[i:i + 100]])
            client.log_batch(run, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            client.log_text(run, text, "recipe.yaml")

        if recipe.tracking.system_metrics and self._monitor is None:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.uri,
                                                     resume_logging=not self._created)
                self._monitor.start()
            except Exception as e:  # noqa: BLE001
                log.warning("MLflow system metrics are off: %s", e)
                self._monitor = None
        return describe

    def _reconnect(self) -> None:
        """On the worker, while offline: start the run if it never started, then send the backlog.
        Raises what MLflow raises (the caller warns)."""
        if not self.started:
            self._start_run()()
            self.started = True
            log.warning("MLflow at %s answers: run %s %s; sending the steps logged meanwhile from %s",
                        self.uri, self.run_id, "created" if self._created else "reopened", self.local_path)
        n = self._send_backlog()
        if n and self._warned:
            log.warning("MLflow at %s answers again: sent the %d step(s) logged while it was down (from %s)",
                        self.uri, n, self.local_path)
        self.online = True

    def _send_backlog(self) -> int:
        """Send the lines of metrics.jsonl this process wrote and has not sent, in order, then the
        calls made meanwhile; returns how many steps. What was sent is forgotten batch by batch, so a
        failure midway resumes there."""
        from mlflow.entities import Metric

        total = 0
        with open(self.local_path, "rb") as f:
            while self._backlog:
                seg = self._backlog[0]
                f.seek(seg[0])
                pos, ms, steps = seg[0], [], 0
                while pos < seg[1]:
                    line = f.readline()
                    if not line:
                        break
                    pos += len(line)
                    try:
                        rec = json.loads(line)
                        step, ts = int(rec.pop("step")), float(rec.pop("time"))
                        rec.pop("run_id", None)
                        ms += [Metric(k, float(v), int(ts * 1000), step) for k, v in rec.items()]
                    except (ValueError, KeyError, TypeError, AttributeError):
                        continue  # a line cut by a full disk: the others are still worth sending
                    steps += 1
                    if len(ms) >= 900 or pos >= seg[1]:
                        for i in range(0, len(ms), 1000):  # MLflow caps a batch at 1000 metrics
                            self._client.log_batch(self.run_id, metrics=ms[i:i + 1000])
                        seg[0] = pos
                        total += steps
                        self.replayed += steps
                        ms, steps = [], 0
                self._backlog.pop(0)
        while self._pending:  # at most once each: a call that always fails must not block the steps
            self._pending.pop(0)()
        return total

    def _unsent(self, start: Optional[int], end: Optional[int]) -> None:
        """Our line [start, end) of the file was not sent: add it to the backlog."""
        if start is None or end is None:  # not in the file either (it could not be written)
            return
        if self._backlog and self._backlog[-1][1] == start:
            self._backlog[-1][1] = end
        else:
            self._backlog.append([start, end])

    def _warn(self, err: BaseException, note: str = "") -> None:
        self.online = False
        self._last_try = time.time()  # the worker tries again retry_interval_s after a failure
        monitor, self._monitor = self._monitor, None
        if monitor is not None:  # it would warn every 10 s; finish() joins it, so not on this thread
            threading.Thread(target=monitor.finish, name="v2pe-mlflow-monitor-stop", daemon=True).start()
        if not self._warned:
            self._warned = True
            first = _short_reason(err) + (f"; {note}" if note else "")
            log.warning("MLflow at %s is not reachable (%s): training continues; every step is kept in %s "
                        "and sent to MLflow once the server answers (checked every %.0fs)%s",
                        self.uri, first, self.local_path, self._recipe.tracking.retry_interval_s,
                        "" if self.started else "; the MLflow run is created then")

    def _work(self) -> None:
        from mlflow.entities import Metric

        while True:
            item = self._queue.get()
            batch = [item]
            while item[0] == "metrics" and len(batch) < 50:  # one request for what piled up
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(nxt)
                if nxt[0] != "metrics":
                    break
            metrics = [b for b in batch if b[0] == "metrics"]
            end = next((b for b in batch if b[0] == "end"), None)
            call = next((b[1] for b in batch if b[0] == "call"), None)
            if not self.online:
                for _, _, _, _, lo, hi in metrics:  # all of it is in the file: sent from there
                    self._unsent(lo, hi)
                metrics = []
                # at the end too: the server may be back, and each try is bounded
                if end is not None or time.time() - self._last_try >= self._recipe.tracking.retry_interval_s:
                    try:
                        self._reconnect()
                    except Exception as e:  # noqa: BLE001
                        self._warn(e)
            if call is not None and not self.online and len(self._pending) < 100:
                self._pending.append(call)  # after the backlog, once the server answers
            elif call is not None and self.online:
                try:
                    call()
                except Exception as e:  # noqa: BLE001
                    self._warn(e)
            if metrics and self.online:
                ms = [Metric(k, v, int(ts * 1000), step) for _, step, ts, m, _, _ in metrics for k, v in m.items()]
                try:
                    for i in range(0, len(ms), 1000):  # MLflow caps a batch at 1000 metrics
                        self._client.log_batch(self.run_id, metrics=ms[i:i + 1000])
                except Exception as e:  # noqa: BLE001
                    self._warn(e)
                    for _, _, _, _, lo, hi in metrics:
                        self._unsent(lo, hi)
            if end is not None:
                self._finish(end[1])
                return

    def _finish(self, status: str) -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:  # noqa: BLE001
                pass
        if not self.started or self._client is None:
            if self._backlog:
                log.warning("MLflow at %s never answered: no MLflow run; every step is in %s", self.uri,
                            self.local_path)
            return
        if self._backlog:
            log.warning("MLflow run %s lacks the steps logged while the server was down; they are in %s",
                        self.run_id, self.local_path)
        try:  # also when the server was down: it may be back, and each try is bounded
            self._client.set_terminated(self.run_id, status=status)
        except Exception as e:  # noqa: BLE001
            self._warn(e)
            log.warning("MLflow run %s could not be marked %s", self.run_id, status)

    # -- API ---------------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if not self.active:
            return
        m = {k: float(v) for k, v in metrics.items() if v is not None}
        m.update(memory_metrics())
        ts = time.time()
        line = (json.dumps({"run_id": self.run_id, "step": step, "time": round(ts, 3), **m}) + "\n").encode()
        lo: Optional[int] = None
        hi: Optional[int] = None
        try:
            n = self._local.write(line)
            if n == len(line):
                hi = self._local.tell()  # O_APPEND: the end of what was just written
                lo = hi - n
        except (OSError, ValueError) as e:  # a full disk is not a reason to stop training either
            if not self._local_failed:
                self._local_failed = True
                log.warning("cannot append to %s (%s); MLflow still gets the metrics", self.local_path, e)
        item = ("metrics", step, ts, m, lo, hi)
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                try:  # the oldest unsent step goes (it is in the JSONL file)
                    self._queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def log_artifact(self, path: str | os.PathLike) -> None:
        """Upload a file to the run, on the worker like every other MLflow call (bounded, never
        raising); the file stays where it is whatever the server does."""
        if not self.active:
            return
        f = str(path)
        # run and client read on the worker: a run the worker created after an outage gets it too
        try:
            self._queue.put(("call", lambda: self._client.log_artifact(self.run_id, f)), timeout=CLOSE_TIMEOUT_S)
        except queue.Full:
            log.warning("MLflow is too slow to take %s; it stays on disk", f)

    def close(self, status: str = "FINISHED") -> None:
        """End the run. Called from a ``finally`` while an exception propagates, the status becomes
        KILLED (KeyboardInterrupt) or FAILED (anything else) whatever ``status`` says, so a run
        never stays RUNNING after its process died of an exception."""
        if not self.active or self._closed:
            return
        status = exit_status(status)
        if status not in STATUSES:
            raise ValueError(f"MLflow run status must be one of {STATUSES}, got {status!r}")
        self._closed = True
        self.active = False
        while True:
            try:
                self._queue.put(("end", status), timeout=1.0)
                break
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
        if self._thread is not None:
            self._thread.join(CLOSE_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("MLflow did not answer within %.0fs at close; run %s may show as RUNNING "
                            "(metrics are in %s)", CLOSE_TIMEOUT_S, self.run_id, self.local_path)
        self._local.close()
        if self.dropped:
            log.warning("%d step(s) were not sent to MLflow (the server was slow); they are in %s",
                        self.dropped, self.local_path)

    def _at_exit(self) -> None:
        # The interpreter is exiting with the run still open (an exit that skipped the loop's
        # finally): the run did not finish.
        if self.active and not self._closed:
            self.close("FAILED")
