"""``runtime.sbatch``: the sbatch line that fits a recipe's layout, refusals with the fix, the run folder."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from v2pe_megatron.config import RecipeError, load_recipe
from v2pe_megatron.runtime import sbatch

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny_cpu.yaml")


def _recipe(*overrides):
    return load_recipe(TINY, list(overrides))


def test_gpu_allocation_gives_one_task_per_gpu_and_the_layout():
    r = _recipe("parallel.tp=2", "parallel.cp=2", "data.global_batch_size=8")
    cmd = sbatch.sbatch_command(r, "recipes/tiny_cpu.yaml", ["parallel.tp=2", "parallel.cp=2", "data.global_batch_size=8"],
                                nodes=2, gpus_per_node=4, time="1-00:00:00", script="slurm/train.sbatch")
    assert cmd.argv == ("sbatch", "--job-name=tiny_cpu", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4",
                        "--time=1-00:00:00", "--signal=USR1@300", "slurm/train.sbatch", "recipes/tiny_cpu.yaml",
                        "parallel.tp=2", "parallel.cp=2", "data.global_batch_size=8")
    assert (cmd.layout.tp, cmd.layout.pp, cmd.layout.cp, cmd.layout.dp) == (2, 1, 2, 2)
    assert cmd.ranks == cmd.layout.world_size == 8
    assert shlex.split(cmd.command_line()) == list(cmd.argv)
    assert "tp=2 pp=1 cp=2 dp=2 on 2 node(s) x 4 GPUs = 8 ranks" in cmd.describe()


def test_cpu_default_uses_the_launcher_section():
    cmd = sbatch.sbatch_command(_recipe(), "r.yaml", script="s")
    assert "--ntasks-per-node=2" in cmd.argv and "--nodes=1" in cmd.argv
    assert not any(a.startswith("--gpus") for a in cmd.argv)
    assert "--time=04:00:00" in cmd.argv


def test_world_size_that_the_batch_cannot_use_is_refused_with_the_node_counts_that_fit():
    with pytest.raises(RecipeError) as e:  # global batch 2 = 1 micro-batch x dp: dp=8 cannot work
        sbatch.sbatch_command(_recipe(), "r.yaml", nodes=2, gpus_per_node=4, script="s")
    msg = str(e.value)
    assert "does not fit 2 node(s) x 4 GPUs = 8 ranks" in msg
    assert "data.global_batch_size=2 must be a multiple of micro_batch_size*dp = 1*8" in msg
    with pytest.raises(RecipeError, match=r"it fits --nodes 1, 2\b"):
        sbatch.sbatch_command(_recipe(), "r.yaml", nodes=4, gpus_per_node=1, script="s")


def test_world_size_not_divisible_by_the_model_parallel_size_is_refused():
    r = _recipe("parallel.tp=2", "parallel.pp=2", "data.global_batch_size=8")
    with pytest.raises(RecipeError, match=r"world size 6 is not divisible by tp\*pp\*cp = 2\*2\*1 = 4"):
        sbatch.sbatch_command(r, "r.yaml", nodes=1, gpus_per_node=6, script="s")


def test_tensor_parallel_groups_stay_inside_a_node():
    r = _recipe("parallel.tp=2", "data.global_batch_size=6")
    with pytest.raises(RecipeError, match=r"parallel.tp=2 does not divide the 3 ranks per node.*use tp in \[1, 3\]"):
        sbatch.sbatch_command(r, "r.yaml", nodes=2, gpus_per_node=3, script="s")
    sbatch.sbatch_command(r, "r.yaml", nodes=1, gpus_per_node=6, script="s")  # one node: any split is local


# Every form sbatch's --time takes (sbatch(1); Slurm's time_str2secs): minutes, MM:SS, HH:MM:SS,
# D-HH, D-HH:MM, D-HH:MM:SS; fields are not range-checked, seconds round up to the minute.
@pytest.mark.parametrize("text,seconds", [
    ("02:00:00", 7200), ("0:02:00", 120), ("1-00:00:00", 86400), ("5", 300), ("120", 7200), ("2:00", 120),
    ("90:30", 5460), ("1-12", 129600), ("1-12:30", 131400), ("1-12:30:15", 131460), ("01:61:00", 7260),
    ("36:00:00", 129600)])
def test_time_limits_in_every_form_sbatch_takes(text, seconds):
    assert sbatch.parse_time(text) == seconds


@pytest.mark.parametrize("text,why", [
    ("2h", "minutes, MM:SS, HH:MM:SS"), ("1:2:3:4", "minutes, MM:SS"), ("", "minutes, MM:SS"),
    ("00:01:00", "at least 2 minutes"), ("1", "at least 2 minutes"),
    ("UNLIMITED", "give a time limit"), ("0", "give a time limit")])
def test_bad_time_limits_name_the_format(text, why):
    with pytest.raises(RecipeError, match="--time") as e:
        sbatch.parse_time(text)
    assert why in str(e.value)


def test_a_short_limit_warns_that_start_up_eats_the_time_before_the_signal():
    cmd = sbatch.sbatch_command(_recipe(), "r.yaml", time="2", script="s")
    assert "--time=2" in cmd.argv and "--signal=USR1@60" in cmd.argv
    assert len(cmd.warnings) == 1 and "leaves each start 60 s before Slurm's USR1" in cmd.warnings[0]
    assert not sbatch.sbatch_command(_recipe(), "r.yaml", time="1-00", script="s").warnings


@pytest.mark.parametrize("limit,spec,warns", [
    ("2:00", "USR1@300", True), ("5:00", "USR1@300", True), ("5:01", "USR1@300", False),
    ("10:00", "B:USR1@600", True), ("1-00:00:00", "USR1@300", False), ("UNLIMITED", "USR1@300", False),
    ("1:00", "USR1", True), ("2:00", "USR1", False), ("2:00", "", False), ("garbage", "USR1@300", False)])
def test_job_start_warning_when_the_limit_is_not_longer_than_the_signal_lead(limit, spec, warns):
    w = sbatch.time_limit_warning(limit, spec)
    assert (w is not None) == warns
    if warns:
        assert f"time limit ({limit}) is not longer than the lead" in w and "--print-sbatch" in w


def test_signal_lead_covers_slurms_timer_and_leaves_the_job_time_to_train():
    assert sbatch.signal_lead_s(120) == 60
    assert sbatch.signal_lead_s(600) == 150
    assert sbatch.signal_lead_s(4 * 3600) == 300


def test_run_folder_keyed_by_the_job_name_unless_the_recipe_sets_checkpoint_dir():
    assert sbatch.run_folder_overrides(_recipe(), "my job/1") == ['name="my_job_1"',
                                                                  "checkpoint.dir=runs/my_job_1/checkpoints"]
    assert sbatch.run_folder_overrides(_recipe("checkpoint.dir=/ckpt/x"), "j") == ['name="j"']
    for name in ("007", "true", "1e3"):  # stay the job's name, not a number or a boolean
        r = load_recipe(TINY, sbatch.run_folder_overrides(_recipe(), name))
        assert r.name == name and r.checkpoint.dir == f"runs/{name}/checkpoints"
    with pytest.raises(RecipeError, match="--run-name"):
        sbatch.run_folder_overrides(_recipe(), "..")


def test_the_script_path_is_this_checkouts(tmp_path):
    assert sbatch.train_script(ROOT) == "slurm/train.sbatch"
    assert Path(sbatch.train_script(tmp_path)) == ROOT / "slurm" / "train.sbatch"
    assert (ROOT / "slurm" / "train.sbatch").is_file()
