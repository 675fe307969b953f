"""``slurm/train.sbatch`` on a real Slurm (the cluster of ``conftest.py``), CPU path: gloo ranks.

1. ``sbatch --ntasks=2 slurm/train.sbatch recipes/tiny_cpu.yaml`` completes with a checkpoint and a
   FINISHED MLflow run in the job's run folder; nothing is written next to the scripts.
2. A 2-minute job with far more steps than fit: Slurm's USR1 reaches both ranks, they save and exit
   75, the script requeues the job, the requeued job resumes from that checkpoint and says so;
   ``scancel`` then stops it without another requeue. Its per-step losses, in one MLflow run, are
   the uninterrupted run's.
3. A broken recipe fails once (exit 2) and is not requeued.
4. Restarts are bounded: with ``V2PE_MAX_RESTARTS=0`` a stop signal ends the job (exit 75, FAILED).
5. A time limit shorter than the signal lead (``--time=2`` with the script's ``USR1@300``): a warning
   at start, and USR1 before the first step ends the job (exit 138, nothing new saved) without a
   requeue, instead of requeueing it until the restart bound with no progress.

Test 2 slows steps down (a ``sitecustomize`` on the ranks' PYTHONPATH sleeps in the forward step)
so that the first slot runs a few dozen steps rather than hundreds; it prints the measured
signal-to-exit and requeue-to-resume times.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "slurm" / "train.sbatch")
TINY = str(ROOT / "recipes" / "tiny_cpu.yaml")

pytestmark = pytest.mark.slow

SLOW_STEPS = '''
import os
if os.environ.get("V2PE_TEST_STEP_SLEEP"):
    import time
    from v2pe_megatron.runtime.quiet import quiet_library_warnings
    quiet_library_warnings()
    from v2pe_megatron.training import loop
    _forward, _sleep = loop.vlm_forward_step, float(os.environ["V2PE_TEST_STEP_SLEEP"])

    def slowed(data_iterator, model):
        time.sleep(_sleep)
        return _forward(data_iterator, model)

    loop.vlm_forward_step = slowed
'''


def _slurm_listing() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "slurm").rglob("*"))


def _runs(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return client, runs


def _losses(client, run_id: str) -> dict[int, float]:
    hist = client.get_metric_history(run_id, "loss")
    steps = [m.step for m in hist]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {sorted(steps)}"
    return {m.step: m.value for m in hist}


def test_train_sbatch_completes_with_checkpoint_and_mlflow_run(slurm_cluster, tmp_path):
    before = _slurm_listing()
    job = slurm_cluster.sbatch("--ntasks=2", SCRIPT, TINY, cwd=tmp_path)
    info = slurm_cluster.wait(job, timeout=400)
    out = slurm_cluster.output(job)
    assert info["JobState"] == "COMPLETED", out[-4000:]
    assert info["Restarts"] == "0" and info["ExitCode"] == "0:0", info
    assert Path(info["StdOut"]) == tmp_path / f"train.sbatch-{job}.out"  # one log per job id, in the workdir
    assert "2 rank(s) on 1 node(s)" in out and "ran steps 1..30 on 2 rank(s)" in out, out[-4000:]

    run_dir = tmp_path / "runs" / "tiny_cpu"  # no --job-name: keyed by the recipe file's name
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "30"
    assert (run_dir / "checkpoints" / "iter_0000030" / "manifest.json").is_file()
    assert (run_dir / f"train.sbatch-{job}.out").resolve() == Path(info["StdOut"])  # the log, linked
    client, runs = _runs(f"sqlite:///{run_dir / 'mlflow.db'}")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_id, r.info.status) for r in runs]
    assert sorted(_losses(client, runs[0].info.run_id)) == list(range(1, 31))
    assert f"MLflow run {runs[0].info.run_id}" in out
    assert _slurm_listing() == before, "the job wrote next to the scripts in slurm/"


def _hooked_env(slurm_cluster, tmp_path, hook_source: str, **variables: str) -> dict:
    """The job's environment with ``hook_source`` as a ``sitecustomize`` every rank imports first."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(hook_source)
    return dict(slurm_cluster.env, **variables, PYTHONPATH=os.pathsep.join([str(hook), slurm_cluster.env["PYTHONPATH"]]))


def test_time_limit_signal_checkpoint_requeue_resume(slurm_cluster, tmp_path):
    env = _hooked_env(slurm_cluster, tmp_path, SLOW_STEPS, V2PE_TEST_STEP_SLEEP="0.5")
    overrides = ["train.steps=100000", "tracking.system_metrics=false"]
    job = slurm_cluster.sbatch("--ntasks=2", "--time=2", "--signal=USR1@60", "--job-name=requeue", SCRIPT, TINY,
                               *overrides, cwd=tmp_path, env=env)

    # Follow the log; note when each event first shows (polled every 0.25 s).
    seen: dict[str, float] = {}
    marks = {"signal": "got SIGUSR1", "exit": "ranks exited with code 75", "requeue": "requeued job",
             "resumed": "resumed from"}
    resumed_at, out = None, ""
    end = time.monotonic() + 420
    while time.monotonic() < end:
        out = slurm_cluster.output(job)
        for k, text in marks.items():
            if k not in seen and text in out:
                seen[k] = time.time()
        m = re.search(r"resumed from \S+ at step (\d+)", out)
        if m:
            resumed_at = int(m.group(1))
            if re.search(rf"step {resumed_at + 3}/100000 ", out):
                break
        assert slurm_cluster.job(job)["JobState"] not in {"FAILED", "COMPLETED", "CANCELLED", "TIMEOUT"}, out[-4000:]
        time.sleep(0.25)
    else:
        raise AssertionError(f"no resume within the time allowed:\n{out[-4000:]}")
    slurm_cluster.run("scancel", job)
    info = slurm_cluster.wait(job, timeout=120)
    time.sleep(3)  # a requeue after scancel would show as PENDING by now
    info = slurm_cluster.job(job)
    out = slurm_cluster.output(job)
    restarted = datetime.strptime(re.search(r"start 2, (\S+Z):", out).group(1), "%Y-%m-%dT%H:%M:%SZ")
    restarted = restarted.replace(tzinfo=timezone.utc).timestamp()
    print(f"\nsignal -> ranks exited: {seen['exit'] - seen['signal']:.1f} s; requeue -> 'resumed from': "
          f"{seen['resumed'] - seen['requeue']:.0f} s (requeue -> job started again: {restarted - seen['requeue']:.0f} s "
          f"with cred_expire=10 and the scheduler every 5 s; then start-up and loading the checkpoint)")

    first, second = out.split("start 2,", 1)
    # Slurm signalled each rank itself (not only the batch shell); both saved and exited 75.
    assert len(set(re.findall(r"rank pid (\d+) got SIGUSR1", first))) == 2, first[-4000:]
    stopped = int(re.search(r"stopping after step (\d+): a stop signal", first).group(1))
    assert f"saved checkpoint runs/requeue/checkpoints/iter_{stopped:07d} at step {stopped}" in first
    assert f"requeued job {job} (restart 1 of 10)" in first
    assert resumed_at == stopped
    assert f"resumed from runs/requeue/checkpoints/iter_{stopped:07d} at step {stopped}" in second
    # scancel: the ranks save again, and the job is not requeued.
    assert "not requeueing here" in second, second[-3000:]
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "1", info

    client, runs = _runs(f"sqlite:///{tmp_path / 'runs' / 'requeue' / 'mlflow.db'}")
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]
    got = _losses(client, runs[0].info.run_id)
    last = max(got)
    assert sorted(got) == list(range(1, last + 1)) and last >= stopped + 3, sorted(got)

    # The uninterrupted run: same recipe and schedule, as many steps, one process tree, no Slurm.
    ref = tmp_path / "reference"
    ref.mkdir()
    env_ref = {k: v for k, v in slurm_cluster.env.items() if k != "SLURM_CONF"}
    r = subprocess.run([sys.executable, "-m", "v2pe_megatron.cli.train", TINY, *overrides,
                        f"train.exit_after_steps={last}", "checkpoint.dir=ckpt"],
                       cwd=ref, env=env_ref, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client_ref, runs_ref = _runs(f"sqlite:///{ref / 'runs' / 'tiny_cpu' / 'mlflow.db'}")
    want = _losses(client_ref, runs_ref[0].info.run_id)
    assert sorted(want) == sorted(got)
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= 1e-5, {s: (got[s], want[s]) for s in want if abs(got[s] - want[s]) > 1e-5}


def test_broken_recipe_fails_once_without_requeue(slurm_cluster, tmp_path):
    broken = tmp_path / "broken.yaml"
    text = Path(TINY).read_text()
    assert "  tp: 1\n" in text
    broken.write_text(text.replace("  tp: 1\n", "  tp: 3\n"))  # 3 divides no head count
    job = slurm_cluster.sbatch("--ntasks=2", SCRIPT, str(broken), cwd=tmp_path)
    info = slurm_cluster.wait(job, timeout=300)
    out = slurm_cluster.output(job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, out[-3000:])
    assert "parallel.tp=3 must divide" in out
    assert "exit code 2 is an error, not a stop request: not requeued" in out
    time.sleep(3)
    info = slurm_cluster.job(job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
    assert out.count("start 1,") == 1 and "start 2," not in slurm_cluster.output(job)


def test_restart_limit_stops_requeueing(slurm_cluster, tmp_path):
    # `scancel --signal=USR1` does what --signal=USR1@N does at the limit: USR1 to every rank.
    env = dict(slurm_cluster.env, V2PE_MAX_RESTARTS="0")
    job = slurm_cluster.sbatch("--ntasks=2", "--job-name=bounded", SCRIPT, TINY, "train.steps=100000",
                               "tracking.system_metrics=false", cwd=tmp_path, env=env)
    end = time.monotonic() + 300
    while "step 2/100000 " not in slurm_cluster.output(job):
        assert time.monotonic() < end and slurm_cluster.job(job)["JobState"] in {"PENDING", "RUNNING"}, \
            slurm_cluster.output(job)[-3000:]
        time.sleep(0.5)
    slurm_cluster.run("scancel", "--signal=USR1", job)
    info = slurm_cluster.wait(job, timeout=120)
    out = slurm_cluster.output(job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", (info, out[-3000:])
    assert "already requeued 0 times (V2PE_MAX_RESTARTS=0): not requeueing" in out
    assert len(set(re.findall(r"rank pid (\d+) got SIGUSR1", out))) == 2
    time.sleep(3)
    assert slurm_cluster.job(job)["Restarts"] == "0"


HOLD_START = '''
import os
if os.environ.get("V2PE_TEST_HOLD_START"):
    import sys
    import time
    from v2pe_megatron.runtime import quiet
    _quiet = quiet.quiet_library_warnings

    def held():  # v2pe-train calls this first, with its early-stop handler armed
        print("v2pe-test: held in start-up", file=sys.stderr, flush=True)
        time.sleep(float(os.environ["V2PE_TEST_HOLD_START"]))
        _quiet()

    quiet.quiet_library_warnings = held
'''


def test_time_limit_not_longer_than_the_signal_lead_warns_and_is_not_requeued(slurm_cluster, tmp_path):
    env = _hooked_env(slurm_cluster, tmp_path, HOLD_START, V2PE_TEST_HOLD_START="100")
    job = slurm_cluster.sbatch("--ntasks=1", "--time=2", "--job-name=short", SCRIPT, TINY, "tracking.backend=none",
                               cwd=tmp_path, env=env)
    # Slurm's own USR1 is due at once but comes with its next 30 s timer tick, and is lost if that tick
    # falls before srun started the rank; the same signal sent now makes the test deterministic.
    end = time.monotonic() + 120
    while "held in start-up" not in slurm_cluster.output(job):
        assert time.monotonic() < end and slurm_cluster.job(job)["JobState"] in {"PENDING", "RUNNING"}, \
            slurm_cluster.output(job)[-3000:]
        time.sleep(0.25)
    slurm_cluster.run("scancel", "--signal=USR1", job, check=False)  # may already have ended by Slurm's
    info = slurm_cluster.wait(job, timeout=120)
    out = slurm_cluster.output(job)
    assert ("v2pe: warning: this job's time limit (2:00) is not longer than the lead of its stop signal "
            "(--signal=USR1@300)") in out, out[-3000:]
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "138:0", (info, out[-3000:])
    assert "got SIGUSR1 before training started: nothing trained, nothing new to save; exit code 138" in out
    assert "the ranks ended by SIGUSR1 without saving anything new" in out and "USR1 is the time-limit signal" in out
    assert "scontrol requeue" not in out and "requeued job" not in out
    time.sleep(3)  # a requeue would show as PENDING by now
    assert slurm_cluster.job(job)["Restarts"] == "0" and "start 2," not in slurm_cluster.output(job)
