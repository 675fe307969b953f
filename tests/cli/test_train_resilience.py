"""``v2pe-train`` under signals, kills and non-finite losses, end to end on 2 self-started gloo ranks.

- SIGTERM to every process (as Slurm does), and SIGTERM to the self-launching parent alone, mid-run:
  a complete checkpoint, exit code ``RESUME``, the MLflow run KILLED; the same command again ends
  with the uninterrupted run's per-step losses (1e-5) in the same MLflow run, FINISHED.
- SIGKILL of every process at 5 random moments, one of them during a save: ``latest`` always names
  a checkpoint that verifies, each rerun resumes from it, every logged loss is on the uninterrupted
  curve.
- SIGKILL of the parent alone: the ranks do not outlive it.
- A planted NaN loss is skipped and counted; ``train.max_nonfinite_steps`` in a row stop the run
  after a save with ``NONFINITE`` and the MLflow run FAILED.
- A damaged newest checkpoint: named in a warning, the previous one is used, same losses.
- ``checkpoint.load=false`` over existing checkpoints is refused; with ``checkpoint.overwrite=true``
  keep_last deletes none of the checkpoints this run did not write.

The test-only hook (a ``sitecustomize`` on the ranks' PYTHONPATH) wraps the loop's forward step from
outside: it slows steps down (so a signal lands mid-run) and poisons the loss of chosen steps.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from v2pe_megatron.runtime import exit_codes

ROOT = Path(__file__).resolve().parents[2]
STEPS = 16  # enough for 5 chained kills to land before the run ends

HOOK = '''
import os
if os.environ.get("V2PE_TEST_HOOK"):
    import time
    from v2pe_megatron.training import loop
    _forward, _calls = loop.vlm_forward_step, [0]
    _nan = {int(x) for x in os.environ.get("V2PE_TEST_NAN_CALLS", "").split(",") if x}
    _sleep = float(os.environ.get("V2PE_TEST_STEP_SLEEP", "0"))

    def planted(data_iterator, model):
        _calls[0] += 1
        time.sleep(_sleep)
        out, loss_func = _forward(data_iterator, model)
        if _calls[0] not in _nan:
            return out, loss_func

        def poisoned(output):
            loss_sum, n, report = loss_func(output)
            report = report["lm loss"].clone()
            report[0] = float("nan")
            return loss_sum * float("nan"), n, {"lm loss": report}
        return out, poisoned

    loop.vlm_forward_step = planted
'''


class Run:
    """One ``v2pe-train`` command in the background, its output collected line by line."""

    def __init__(self, tmp: Path, *overrides: str, sleep: float = 0.0, nan_calls: str = "",
                 ckpt: Path | None = None):
        hook_dir = tmp.parent / (tmp.name + "_hook")
        hook_dir.mkdir(exist_ok=True)
        (hook_dir / "sitecustomize.py").write_text(HOOK)
        env = dict(os.environ, PYTHONUNBUFFERED="1", V2PE_TEST_HOOK="1", V2PE_TEST_STEP_SLEEP=str(sleep),
                   V2PE_TEST_NAN_CALLS=nan_calls,
                   PYTHONPATH=os.pathsep.join([str(hook_dir), str(ROOT), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "v2pe_megatron.cli.train", str(ROOT / "recipes/tiny_cpu.yaml"),
               "tracking.system_metrics=false", f"checkpoint.dir={ckpt or tmp / 'ckpt'}", "data.seq_length=128",
               f"train.steps={STEPS}", *overrides]
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def ranks(self) -> list[int]:
        import psutil

        return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        end = time.time() + timeout
        while time.time() < end:
            m = re.search(pattern, self.out)
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r} in the output:\n{self.out[-4000:]}")

    def wait(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc


def _losses(out: str) -> dict[int, list[float]]:
    got: dict[int, list[float]] = {}
    for step, loss in re.findall(r"step (\d+)/\d+  loss ([0-9.na]+)", out):
        got.setdefault(int(step), []).append(float(loss))
    return got


def _alive(pids: list[int]) -> list[int]:
    import psutil

    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def _mlflow_runs(tmp: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'runs/tiny_cpu/mlflow.db'}")
    return mlflow.search_runs(experiment_names=["v2pe-megatron"], output_format="list")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (checkpoints at 4, 8, 12, 16; keep_last=2 leaves 12 and 16): its losses,
    log and checkpoint folder."""
    tmp = tmp_path_factory.mktemp("ref")
    r = Run(tmp, "checkpoint.save_interval=4")
    assert r.wait() == 0, r.out[-4000:]
    losses = {k: v[0] for k, v in _losses(r.out).items()}
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses, r.out, tmp / "ckpt"


def _assert_on_curve(ref: dict[int, float], *outs: str) -> set[int]:
    steps = set()
    for out in outs:
        for step, values in _losses(out).items():
            assert values == pytest.approx([ref[step]] * len(values), abs=1e-5), (step, values, ref[step])
            steps.add(step)
    return steps


@pytest.mark.slow
def test_final_step_saved_once_with_one_log_line(reference):
    _, out, ckpt = reference
    assert len(re.findall(r"saved checkpoint \S+iter_0000016 at step 16 \(\d+\.\d s\)", out)) == 1
    assert len(re.findall(r"saved checkpoint \S+iter_0000004 at step 4", out)) == 1
    assert "async save is deprecated" not in out
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000012", "iter_0000016"]
    assert (ckpt / "iter_0000016" / "manifest.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["all", "parent"])
def test_sigterm_mid_run_saves_and_resumes(reference, tmp_path, target):
    ref, _, _ = reference
    first = Run(tmp_path, sleep=0.4)
    first.wait_for(r"step 2/")
    ranks = first.ranks()
    assert len(ranks) == 2
    t = time.time()
    for pid in ([first.proc.pid] + ranks if target == "all" else [first.proc.pid]):
        os.kill(pid, signal.SIGTERM)
    first.wait_for(r"stopping after step")
    for pid in [first.proc.pid] + ranks:  # a second signal, during the save, changes nothing
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    rc = first.wait()
    seconds = time.time() - t
    print(f"SIGTERM to {target}: exit {rc} after {seconds:.2f} s")
    assert rc == exit_codes.RESUME, first.out[-4000:]
    assert not _alive(ranks)
    stopped = int((tmp_path / "ckpt" / "latest").read_text())
    assert 2 <= stopped < STEPS
    assert re.search(rf"saved checkpoint \S+ at step {stopped} ", first.out)
    from v2pe_megatron.training.checkpointing import iteration_dir, verify

    assert verify(iteration_dir(tmp_path / "ckpt", stopped)) is None
    (run,) = _mlflow_runs(tmp_path)
    assert run.info.status == "KILLED"

    second = Run(tmp_path)
    assert second.wait() == 0, second.out[-4000:]
    assert f"resumed from {iteration_dir(tmp_path / 'ckpt', stopped)} at step {stopped}" in second.out
    assert _assert_on_curve(ref, first.out, second.out) == set(range(1, STEPS + 1))
    (run,) = _mlflow_runs(tmp_path)  # the same run, continued
    assert run.info.status == "FINISHED"
    import mlflow

    hist = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert sorted({h.step for h in hist}) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_sigkill_at_random_moments(reference, tmp_path):
    """Kill every process of the run 5 times (the first time while a checkpoint is being written),
    rerunning the same command each time; then let it finish."""
    from v2pe_megatron.training.checkpointing import iteration_dir, verify

    ref, _, _ = reference
    ckpt = tmp_path / "ckpt"
    seed = int(os.environ.get("V2PE_KILL_SEED", time.time_ns() % 2**32))
    print(f"kill moments: V2PE_KILL_SEED={seed}")
    rng = random.Random(seed)
    kills, outs, expected_resume = 0, [], None
    args = ("checkpoint.save_interval=1", "tracking.backend=none")
    for attempt in range(6):
        r = Run(tmp_path, *args, sleep=0.1)
        if attempt < 5:
            first = int(r.wait_for(r"step (\d+)/").group(1))
            if attempt == 0:  # during a save
                end = time.time() + 60
                while not list(ckpt.glob("iter_*.tmp")) and time.time() < end and r.proc.poll() is None:
                    time.sleep(0.002)
                moment = "during a save"
            else:
                # at most ~3 steps per attempt, so that 5 kills land before step STEPS
                later, delay = rng.randint(0, 1), rng.uniform(0.0, 0.3)
                if later:
                    r.wait_for(rf"step {first + 1}/")
                time.sleep(delay)
                moment = f"{delay:.2f} s after step {first + later}"
            victims = [r.proc.pid] + r.ranks()
            # the parent and its 2 ranks only: no checkpoint-writer helper processes
            assert len(victims) == 3 or r.proc.poll() is not None, victims
            saving = [p.name for p in ckpt.glob("iter_*.tmp")]
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            rc = r.wait()
            time.sleep(0.2)
            assert not _alive(victims)
            print(f"kill {attempt + 1}: {moment} (rc {rc}, saving: {saving}), latest: "
                  f"{(ckpt / 'latest').read_text() if (ckpt / 'latest').exists() else None}")
            if rc == -signal.SIGKILL:
                kills += 1
        else:
            assert r.wait() == 0, r.out[-4000:]
        outs.append(r.out)
        if expected_resume is not None:
            assert f"resumed from {iteration_dir(ckpt, expected_resume)} at step {expected_resume}" in r.out
        if (ckpt / "latest").exists():
            expected_resume = int((ckpt / "latest").read_text())
            assert verify(iteration_dir(ckpt, expected_resume)) is None  # latest names a complete one
    assert kills == 5
    assert _assert_on_curve(ref, *outs) == set(range(1, STEPS + 1))


@pytest.mark.slow
def test_sigkill_of_parent_takes_the_ranks_down(tmp_path):
    r = Run(tmp_path, "tracking.backend=none", "train.steps=200", sleep=0.2)
    r.wait_for(r"step 1/")
    ranks = r.ranks()
    os.kill(r.proc.pid, signal.SIGKILL)
    r.wait()
    end = time.time() + 60
    while _alive(ranks) and time.time() < end:
        time.sleep(0.1)
    assert not _alive(ranks), "ranks outlived their parent"


@pytest.mark.slow
def test_nonfinite_steps_skipped_then_stop(tmp_path):
    # forward calls (= steps) 2, 4 and 5 get a NaN loss; 2 in a row stop the run
    r = Run(tmp_path, "train.max_nonfinite_steps=2", nan_calls="2,4,5")
    rc = r.wait()
    assert rc == exit_codes.NONFINITE, r.out[-4000:]
    losses = _losses(r.out)
    assert sorted(losses) == [1, 2, 3, 4, 5]
    assert "update skipped (1 in a row, 1 in all" in r.out
    assert "update skipped (2 in a row, 3 in all" in r.out
    assert (tmp_path / "ckpt" / "latest").read_text() == "5"
    (run,) = _mlflow_runs(tmp_path)
    assert run.info.status == "FAILED"
    import mlflow

    hist = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "skipped/nonfinite_steps")
    assert [(h.step, h.value) for h in sorted(hist, key=lambda h: h.step)] == [
        (1, 0), (2, 1), (3, 1), (4, 2), (5, 3)]


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back(reference, tmp_path):
    ref, _, ckpt = reference
    shutil.copytree(ckpt, tmp_path / "ckpt")
    shard = sorted((tmp_path / "ckpt" / "iter_0000016").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    r = Run(tmp_path, "tracking.backend=none")
    assert r.wait() == 0, r.out[-4000:]
    assert re.search(r"skipping damaged checkpoint \S+iter_0000016: \S+\.distcp has \d+ bytes", r.out)
    assert re.search(r"resumed from \S+iter_0000012 at step 12", r.out)
    assert _assert_on_curve(ref, r.out) == {13, 14, 15, 16}
    from v2pe_megatron.training.checkpointing import iteration_dir, verify

    # the damaged iter_16 was replaced by a complete one, nothing half-written is left
    assert verify(iteration_dir(tmp_path / "ckpt", 16)) is None
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


@pytest.mark.slow
def test_fresh_start_over_checkpoints_needs_overwrite_and_deletes_nothing_foreign(reference, tmp_path):
    _, _, ckpt = reference
    shutil.copytree(ckpt, tmp_path / "ckpt")
    r = Run(tmp_path, "tracking.backend=none", "checkpoint.load=false", "train.steps=3")
    assert r.wait() == exit_codes.ERROR
    assert "checkpoint.overwrite=true" in r.out and "Traceback" not in r.out
    r = Run(tmp_path, "tracking.backend=none", "checkpoint.load=false", "checkpoint.overwrite=true",
            "train.steps=3", "checkpoint.save_interval=1", "checkpoint.keep_last=2")
    assert r.wait() == 0, r.out[-4000:]
    names = sorted(p.name for p in (tmp_path / "ckpt").glob("iter_*"))
    assert names == ["iter_0000002", "iter_0000003", "iter_0000012", "iter_0000016"]
    assert (tmp_path / "ckpt" / "latest").read_text() == "3"


@pytest.mark.slow
def test_sigkill_of_one_rank_ends_the_whole_run(tmp_path):
    r = Run(tmp_path, "tracking.backend=none", "train.steps=200", "checkpoint.save_interval=2", sleep=0.2)
    r.wait_for(r"saved checkpoint")
    ranks = r.ranks()
    os.kill(ranks[1], signal.SIGKILL)
    rc = r.wait(timeout=120)
    assert rc not in (0, exit_codes.RESUME), r.out[-3000:]
    # the parent's last line names the rank that died, not the others' "Connection reset by peer"
    last = r.out.strip().splitlines()[-1]
    assert f"(pid {ranks[1]}) was killed by SIGKILL (exit code 137)" in last and "out-of-memory" in last, r.out[-3000:]
    time.sleep(0.5)
    assert not _alive(ranks)
