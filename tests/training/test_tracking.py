"""The MLflow tracker in-process, on the embedded sqlite store and against an unreachable server:
what a run records, its final status whatever ends it, and that tracking never holds training up.
(The real ``mlflow server`` and the full CLI are in test_tracking_server.py, slow-marked.)"""

from __future__ import annotations

import json
import logging
import time

import pytest

from v2pe_megatron.config import load_recipe
from v2pe_megatron.training import tracking
from v2pe_megatron.training.tracking import Tracker

# Real MLflow stores (sqlite migrations, a background thread, a slow-server stand-in): ~14 s in all,
# kept out of the quick loop.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """MLflow's schema migrations take seconds: run them once, copy the file per test."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    tracking.init_sqlite_store(f"sqlite:///{db}")
    return db


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, empty_store):
    import shutil

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/trk").mkdir(parents=True)
    shutil.copy(empty_store, tmp_path / "runs/trk/mlflow.db")
    for k in tracking.HTTP_DEFAULTS:
        monkeypatch.delenv(k, raising=False)
    return tmp_path


def _recipe(*overrides):
    return load_recipe(None, ["name=trk", "tracking.system_metrics=false", "train.steps=7", *overrides])


def _client(tmp):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs/trk/mlflow.db'}")


def test_sqlite_run_has_params_tags_artifact_metrics_and_finishes(in_tmp):
    t = Tracker(_recipe(), active=True, tags={"layout": "tp=1 pp=1 cp=1 dp=2", "world_size": 2})
    for step in (1, 2, 3):
        t.log_metrics({"loss": 1.0 / step, "grad_norm": None, "skipped/corrupt_image": 0}, step)
    t.close("FINISHED")

    c = _client(in_tmp)
    run = c.get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "7" and run.data.params["name"] == "trk"
    tags = run.data.tags
    assert tags["layout"] == "tp=1 pp=1 cp=1 dp=2" and tags["world_size"] == "2"
    assert tags["device"].startswith(("CPU: ", "GPU: "))
    assert tags["git_commit"] == tags["mlflow.source.git.commit"] == tracking.git_commit()
    assert [h.value for h in c.get_metric_history(t.run_id, "loss")] == pytest.approx([1, 0.5, 1 / 3])
    assert "grad_norm" not in run.data.metrics  # None values are not logged as NaN
    assert run.data.metrics["skipped/corrupt_image"] == 0
    mem = "memory/peak_allocated_gb" if "GPU" in tags["device"] else "memory/rss_gb"
    assert 0 < run.data.metrics[mem] < 1000
    recipe_yaml = c.download_artifacts(t.run_id, "recipe.yaml", str(in_tmp))
    assert "steps: 7" in open(recipe_yaml).read()
    # Every step is in the local JSONL too, with its run id.
    lines = [json.loads(x) for x in (in_tmp / "runs/trk/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and {x["run_id"] for x in lines} == {t.run_id}


def test_log_artifact_uploads_on_the_worker_before_the_run_ends(in_tmp):
    f = in_tmp / "heatmap.txt"
    f.write_text("length x depth")
    t = Tracker(_recipe(), active=True)
    t.log_metrics({"loss": 1.0}, 1)
    t.log_artifact(f)
    t.close("FINISHED")
    c = _client(in_tmp)
    assert c.get_run(t.run_id).info.status == "FINISHED"
    got = c.download_artifacts(t.run_id, "heatmap.txt", str(in_tmp / "dl"))
    assert open(got).read() == "length x depth"
    Tracker(_recipe("tracking.backend=none"), active=True).log_artifact(f)  # inactive: nothing, no error


def test_resumed_tracker_continues_the_same_run(in_tmp):
    first = Tracker(_recipe(), active=True)
    first.log_metrics({"loss": 3.0}, 1)
    first.close("KILLED")
    assert _client(in_tmp).get_run(first.run_id).info.status == "KILLED"
    again = Tracker(_recipe("train.steps=9"), active=True, run_id=first.run_id)
    assert again.run_id == first.run_id
    again.log_metrics({"loss": 2.0}, 2)
    again.close("FINISHED")
    c = _client(in_tmp)
    assert len(c.search_runs([c.get_experiment_by_name("v2pe-megatron").experiment_id])) == 1
    assert [h.step for h in c.get_metric_history(first.run_id, "loss")] == [1, 2]
    assert c.get_run(first.run_id).info.status == "FINISHED"
    assert c.get_run(first.run_id).data.params["train.steps"] == "7"  # params are the first job's


@pytest.mark.parametrize("exc, status", [(RuntimeError("data"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_an_exception_through_close_ends_the_run_failed_or_killed(in_tmp, exc, status):
    t = Tracker(_recipe(), active=True)
    with pytest.raises(type(exc)):
        run_status = "FINISHED"  # what a loop would pass if it did not know
        try:
            raise exc
        finally:
            t.close(run_status)
    assert _client(in_tmp).get_run(t.run_id).info.status == status


def test_inactive_tracker_does_nothing(in_tmp):
    t = Tracker(_recipe(), active=False)
    t.log_metrics({"loss": 1.0}, 1)
    t.close()
    assert t.run_id is None and not (in_tmp / "runs/trk/metrics.jsonl").exists()


def test_unreachable_server_costs_seconds_and_keeps_metrics_locally(in_tmp, caplog):
    caplog.set_level(logging.WARNING)
    t0 = time.monotonic()
    t = Tracker(_recipe("tracking.tracking_uri=http://127.0.0.1:9"), active=True)
    started = time.monotonic() - t0
    for step in range(1, 21):
        t.log_metrics({"loss": float(step)}, step)
    t.close("FINISHED")
    total = time.monotonic() - t0
    assert started < 15 and total < 30, (started, total)  # MLflow's defaults: 4+ minutes
    warnings = [r for r in caplog.records if "not reachable" in r.getMessage()]
    assert len(warnings) == 1 and "Connection refused" in warnings[0].getMessage()
    assert not [r for r in caplog.records if r.getMessage().startswith("Retrying")]
    lines = [json.loads(x) for x in (in_tmp / "runs/trk/metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in lines] == [float(s) for s in range(1, 21)]


def test_a_slow_server_never_blocks_log_metrics(in_tmp, monkeypatch):
    t = Tracker(_recipe(), active=True)
    calls = []

    def slow_log_batch(*a, **k):
        calls.append(1)
        time.sleep(2.0)

    monkeypatch.setattr(t._client, "log_batch", slow_log_batch)
    worst = 0.0
    for step in range(1, tracking.QUEUE_SIZE + 50):  # more than the queue holds
        s = time.perf_counter()
        t.log_metrics({"loss": 1.0}, step)
        worst = max(worst, time.perf_counter() - s)
    assert worst < 0.5, worst  # a blocking call would take the 2 s of one upload
    monkeypatch.setattr(tracking, "CLOSE_TIMEOUT_S", 2.0)
    t.close("FINISHED")
    assert calls and t.dropped > 0  # the oldest unsent steps went; the JSONL has them all
    assert len((in_tmp / "runs/trk/metrics.jsonl").read_text().splitlines()) == tracking.QUEUE_SIZE + 49


def test_git_commit_reads_worktrees_and_packed_refs(tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"
    main_git = tmp_path / "main/.git"
    (main_git / "worktrees/wt").mkdir(parents=True)
    (main_git / "packed-refs").write_text(f"# pack-refs with: peeled\n{sha} refs/heads/feature\n")
    wt = main_git / "worktrees/wt"
    (wt / "HEAD").write_text("ref: refs/heads/feature\n")
    (wt / "commondir").write_text("../..\n")
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt/.git").write_text(f"gitdir: {wt}\n")
    assert tracking.git_commit(tmp_path / "wt") == sha
    (tmp_path / "detached/.git").mkdir(parents=True)
    (tmp_path / "detached/.git/HEAD").write_text(sha + "\n")
    assert tracking.git_commit(tmp_path / "detached") == sha
    (tmp_path / "plain").mkdir()
    assert tracking.git_commit(tmp_path / "plain") == "unknown"


def test_system_metrics_go_to_the_run_store(in_tmp, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.3")
    caplog.set_level(logging.WARNING)
    t = Tracker(_recipe("tracking.system_metrics=true"), active=True)
    t.log_metrics({"loss": 1.0}, 1)
    time.sleep(1.5)
    t.close("FINISHED")
    metrics = _client(in_tmp).get_run(t.run_id).data.metrics
    assert any(k.startswith("system/") for k in metrics), metrics
    assert not (in_tmp / "mlflow.db").exists() and not (in_tmp / "mlruns").exists()  # MLflow's defaults
    assert not [r for r in caplog.records if "Failed" in r.getMessage()]


def test_a_start_interrupted_during_the_migrations_leaves_no_broken_database(tmp_path, monkeypatch):
    # Before: a rank stopped during MLflow's schema migrations (the launcher stops the other ranks
    # when one fails early) left a half-migrated mlflow.db that every later run of the recipe failed on.
    import mlflow.store.db.utils as db_utils

    real = db_utils._upgrade_db

    def dies_halfway(engine):
        with engine.begin() as conn:
            from sqlalchemy import text

            conn.execute(text("CREATE TABLE _alembic_tmp_experiments (x INTEGER)"))
        raise KeyboardInterrupt  # SIGTERM / Ctrl-C in the middle of the migrations

    monkeypatch.setattr(db_utils, "_upgrade_db", dies_halfway)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(KeyboardInterrupt):
        tracking.init_sqlite_store(uri)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(db_utils, "_upgrade_db", real)
    tracking.init_sqlite_store(uri)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]  # no temporary left behind
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri=uri).get_experiment_by_name("Default") is not None


def test_a_checkpoint_run_id_unknown_to_the_store_starts_a_new_run(in_tmp, caplog):
    caplog.set_level(logging.WARNING)
    t = Tracker(_recipe(), active=True, run_id="0123456789abcdef0123456789abcdef")
    assert t.run_id and t.run_id != "0123456789abcdef0123456789abcdef" and t.online
    t.close()
    assert "is not in" in caplog.text
    assert _client(in_tmp).get_run(t.run_id).info.status == "FINISHED"


def _wait(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


def test_a_store_down_at_the_start_gets_the_run_and_every_step_once_it_is_up(in_tmp, empty_store, monkeypatch,
                                                                             caplog):
    # Before: with the store unreachable at the start no run was ever created, whatever came later.
    import shutil

    caplog.set_level(logging.WARNING)
    later = in_tmp / "later"
    later.write_text("")  # a file where the store's folder goes: the store cannot be opened
    t = Tracker(_recipe(f"tracking.tracking_uri=sqlite:///{later / 'mlflow.db'}", "tracking.retry_interval_s=0.1"),
                active=True)
    assert t.run_id is None and not t.online
    for step in range(1, 6):
        t.log_metrics({"loss": float(step)}, step)
    (in_tmp / "heatmap.txt").write_text("made while the store was down")
    t.log_artifact(in_tmp / "heatmap.txt")
    later.unlink()
    later.mkdir()
    shutil.copy(empty_store, later / "mlflow.db")  # the store comes up mid-run
    step = 5
    while not t.online and step < 200:  # the worker retries as steps come in, never in log_metrics
        step += 1
        s = time.perf_counter()
        t.log_metrics({"loss": float(step)}, step)
        assert time.perf_counter() - s < 0.5
        time.sleep(0.05)
    assert t.online and t.run_id
    for step in range(step + 1, step + 4):
        t.log_metrics({"loss": float(step)}, step)
    t.close("FINISHED")
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{later / 'mlflow.db'}")
    run = c.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.steps"] == "7"
    assert run.data.tags["git_commit"] == tracking.git_commit()
    hist = c.get_metric_history(t.run_id, "loss")
    assert [h.step for h in hist] == list(range(1, step + 1)) and [h.value for h in hist] == list(range(1, step + 1))
    assert "steps: 7" in open(c.download_artifacts(t.run_id, "recipe.yaml", str(in_tmp))).read()
    got = c.download_artifacts(t.run_id, "heatmap.txt", str(in_tmp / "dl"))
    assert open(got).read() == "made while the store was down"
    lines = [json.loads(x) for x in (in_tmp / "runs/trk/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, step + 1))
    assert lines[0]["run_id"] is None and lines[-1]["run_id"] == t.run_id
    assert "run %s created" % t.run_id in caplog.text


def test_steps_logged_during_an_outage_are_sent_in_order_when_the_server_is_back(in_tmp, monkeypatch, caplog):
    # Before: a step whose upload failed was only in metrics.jsonl, never in the MLflow run.
    caplog.set_level(logging.WARNING)
    t = Tracker(_recipe("tracking.retry_interval_s=0.05"), active=True)
    real, down = t._client.log_batch, [False]

    def flaky(*a, **k):
        if down[0]:
            raise ConnectionError("[Errno 111] Connection refused")
        return real(*a, **k)

    monkeypatch.setattr(t._client, "log_batch", flaky)
    for step in range(1, 4):
        t.log_metrics({"loss": float(step)}, step)
    assert _wait(lambda: t._queue.empty())
    down[0] = True
    for step in range(4, 30):
        t.log_metrics({"loss": float(step)}, step)
        time.sleep(0.01)
    assert _wait(lambda: not t.online)
    down[0] = False
    for step in range(30, 33):
        t.log_metrics({"loss": float(step)}, step)
    t.close("FINISHED")
    hist = _client(in_tmp).get_metric_history(t.run_id, "loss")
    assert sorted(h.step for h in hist) == list(range(1, 33))  # each once
    assert [h.step for h in sorted(hist, key=lambda h: h.timestamp)] == list(range(1, 33))
    assert t.replayed > 0 and "sent the %d step(s) logged while it was down" % t.replayed in caplog.text
