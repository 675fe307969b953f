"""``v2pe-plan``: the table for people, the same as JSON, the recipe it writes, and nothing-fits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from v2pe_megatron.cli.plan import main
from v2pe_megatron.config import load_recipe, validate

REPO = Path(__file__).resolve().parents[2]
ONE_M = ["--model", "internvl2-2b", "--seq", "1048576", "--gpu-mem", "80"]


def test_1m_on_64_gpus_prints_a_recommended_layout_with_its_breakdown(capsys):
    assert main(ONE_M + ["--gpus", "64"]) == 0
    out = capsys.readouterr().out
    assert "layouts fit" in out and "* recommended: parallel.tp=" in out
    for col in ("params", "grads", "optim", "activ", "logits", "buffers", "total", "step s", "MFU"):
        assert col in out
    rows = [line for line in out.splitlines() if "|" in line and line[:1] in ("*", " ") and "tp pp" not in line]
    assert rows and rows[0].startswith("*") and not any(r.startswith("*") for r in rows[1:])


def test_json_has_the_fields(capsys):
    assert main(ONE_M + ["--gpus", "64", "--json", "--top", "0"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and sum(r["recommended"] for r in rows) == 1 and rows[0]["recommended"]
    for r in rows:
        assert {"tp", "pp", "vpp", "cp", "dp", "micro_batch_size", "recompute", "cp_comm_type", "memory_gib",
                "step_seconds", "mfu", "recommended"} <= set(r)
        assert set(r["memory_gib"]) == {"parameters", "gradients", "optimizer", "activations", "logits", "buffers",
                                        "total"}
        assert r["memory_gib"]["total"] <= 72.0 and r["tp"] * r["pp"] * r["cp"] * r["dp"] == 64
        assert r["step_seconds"] == pytest.approx(sum(r["step_parts"].values()), abs=1e-2)
    assert [r["step_seconds"] for r in rows] == sorted(r["step_seconds"] for r in rows)


def test_one_gpu_says_nothing_fits_and_what_would(capsys):
    assert main(ONE_M + ["--gpus", "1"]) == 1
    out = capsys.readouterr().out
    assert "NOTHING FITS" in out and "GiB per GPU" in out
    # the breakdown adds up to the total: buffers included
    why = next(line for line in out.splitlines() if "the lightest layout" in line)
    total = float(why.split(" needs ")[1].split()[0])
    parts = why.split("GiB per GPU (")[1].split(")")[0].split(", ")
    assert [p.rsplit(" ", 1)[0] for p in parts] == ["activations", "logits", "parameters+gradients+optimizer",
                                                    "buffers"]
    assert sum(float(p.rsplit(" ", 1)[1]) for p in parts) == pytest.approx(total, abs=0.25)
    assert "GPUs of 80 GiB would fit it" in out and "-token pack fits" in out
    assert main(ONE_M + ["--gpus", "1", "--json"]) == 1
    cap = capsys.readouterr()
    assert json.loads(cap.out) == [] and "nothing fits" in cap.err


def test_write_recipe_is_valid_for_the_cluster(tmp_path, capsys):
    path = tmp_path / "my_256k.yaml"
    assert main(["--model", "internvl2-2b", "--seq", "262144", "--gpus", "64", "--gpu-mem", "80",
                 "--loss-chunk-tokens", "2048", "--write-recipe", str(path)]) == 0
    recipe = load_recipe(path, validate_for_world_size=64)
    layout = validate(recipe, world_size=64)
    assert recipe.name == "my_256k" and recipe.data.seq_length == 262144 and recipe.model.loss_chunk_tokens == 2048
    assert layout.world_size == 64 and recipe.launcher.nproc_per_node * recipe.launcher.nnodes == 64
    assert "* recommended: parallel.tp=" + str(layout.tp) in capsys.readouterr().out


def test_bad_arguments(capsys):
    assert main(["--model", "nope", "--seq", "4096", "--gpus", "8", "--gpu-mem", "80"]) == 2
    assert "unknown; choose one of" in capsys.readouterr().err
    assert main(["--model", "internvl2-2b", "--seq", "4096", "--gpus", "8", "--gpu-mem", "0"]) == 2
    assert "--gpu-mem 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "internvl2-2b"])


@pytest.mark.slow
def test_planner_is_torch_free_and_the_script_entry_works():
    """A plan is made on a login node: the planner and its CLI never import torch."""
    code = ("import sys; from v2pe_megatron.cli.plan import main; rc = main(['--model', 'internvl2-2b', '--seq', "
            "'32768', '--gpus', '32', '--gpu-mem', '80', '--json']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)[0]["recommended"] is True
    assert 'v2pe-plan = "v2pe_megatron.cli.plan:main"' in (REPO / "pyproject.toml").read_text()


@pytest.mark.parametrize("flags, says", [
    (["--gpu-mem", "nan"], "--gpu-mem nan must be a finite number > 0"),
    (["--gpu-mem", "inf"], "--gpu-mem inf must be a finite number > 0"),
    (["--image-share", "nan"], "--image-share nan must be in [0, 1]"),
    (["--gpus-per-node", "0"], "--gpus-per-node 0 must be >= 1"),
    (["--top", "-1"], "--top -1 must be >= 0"),
    (["--loss-chunk-tokens", "-1"], "--loss-chunk-tokens -1 must be >= 0"),
    (["--sub-sample", "-1"], "--sub-sample -1 must be >= 0"),
])
def test_bad_numbers_are_refused_with_one_message(flags, says, capsys):
    assert main(["--model", "internvl2-2b", "--seq", "4096", "--gpus", "8", "--gpu-mem", "80", *flags]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.startswith(f"v2pe-plan: {says}") and cap.err.count("\n") == 1, cap.err


def test_write_recipe_keeps_an_existing_file_unless_forced(tmp_path, capsys):
    args = ["--model", "internvl2-2b", "--seq", "4096", "--gpus", "8", "--gpu-mem", "80", "--write-recipe"]
    mine = tmp_path / "mine.yaml"
    mine.write_text("name: mine\n")
    assert main(args + [str(mine)]) == 2
    assert capsys.readouterr().err == (f"v2pe-plan: --write-recipe {mine} exists; pass --force to replace it, "
                                       f"or give another file name\n")
    assert mine.read_text() == "name: mine\n"
    assert main(args + [str(mine), "--force"]) == 0
    assert load_recipe(mine, validate_for_world_size=8).name == "mine" and "preset: internvl2-2b" in mine.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml"]  # no temporary file left
    # a missing folder is made; a folder or a path through a file is refused before planning
    assert main(args + [str(tmp_path / "new" / "deeper" / "r.yaml")]) == 0
    assert (tmp_path / "new" / "deeper" / "r.yaml").is_file()
    capsys.readouterr()
    assert main(args + [str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert main(args + [str(mine / "r.yaml")]) == 2
    assert capsys.readouterr().err == f"v2pe-plan: --write-recipe {mine / 'r.yaml'}: {mine} is a file, not a folder\n"
