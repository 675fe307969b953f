"""``v2pe_megatron.preflight``: what ``v2pe-train`` refuses (or reports as finished) before it starts
a rank, called directly. The CLI's side (exit codes, one message, nothing launched) is in
``tests/cli/test_train_cli.py``."""

from __future__ import annotations

import errno
import json
import os
import tempfile
import sys
from pathlib import Path

import pytest

from v2pe_megatron import preflight
from v2pe_megatron.config import load_recipe
from v2pe_megatron.preflight import PreflightError
from v2pe_megatron.testing.fakes import checkpoint_folder as fake_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny_cpu.yaml"


def _tiny(*overrides: str):
    return load_recipe(TINY, ["tracking.backend=none", *overrides])


# ---------------------------------------------------------------------------------------------
# checkpoint.dir
# ---------------------------------------------------------------------------------------------
def test_a_file_as_checkpoint_dir_is_refused(tmp_path):
    (tmp_path / "f").write_text("a user's file")
    for d in (tmp_path / "f", tmp_path / "f" / "below"):
        with pytest.raises(PreflightError, match=r"checkpoint.dir=.*f is a file.*set checkpoint.dir to a folder"):
            preflight.check_checkpoint_dir(_tiny(f"checkpoint.dir={d}"))
    assert (tmp_path / "f").read_text() == "a user's file"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_proc_as_checkpoint_dir_is_refused():
    with pytest.raises(PreflightError, match=r"checkpoint.dir=/proc/nope: cannot create files in /proc"):
        preflight.check_checkpoint_dir(_tiny("checkpoint.dir=/proc/nope"))


def test_read_only_mount_is_refused(tmp_path, monkeypatch):
    # A read-only mount answers every create with EROFS (root included), which a test cannot mount.
    def erofs(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", erofs)
    with pytest.raises(PreflightError, match="cannot create files in .*Read-only file system.*first save"):
        preflight.check_checkpoint_dir(_tiny(f"checkpoint.dir={tmp_path / 'ckpt'}"))


def test_writable_checkpoint_dir_passes_and_is_left_as_it_was(tmp_path):
    preflight.check_checkpoint_dir(_tiny(f"checkpoint.dir={tmp_path / 'a' / 'b'}"))
    assert list(tmp_path.iterdir()) == []  # nothing created (the first save makes the folder)
    (tmp_path / "ckpt").mkdir()
    preflight.check_checkpoint_dir(_tiny(f"checkpoint.dir={tmp_path / 'ckpt'}"))
    assert list((tmp_path / "ckpt").iterdir()) == []


class Usage:
    def __init__(self, free: int):
        self.total, self.used, self.free = 10 * free, 9 * free, free


def test_too_little_free_space_is_a_warning(tmp_path, monkeypatch):
    from v2pe_megatron.plan import checkpoint_bytes

    recipe = _tiny(f"checkpoint.dir={tmp_path}", "train.steps=10", "checkpoint.save_interval=2",
                   "checkpoint.keep_last=2")
    one = checkpoint_bytes(recipe.model, distributed_optimizer=recipe.parallel.use_distributed_optimizer)
    warned: list[str] = []
    # 3 checkpoints are on disk at once (keep_last=2 plus the one being written)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(free=3 * one - 1))
    preflight.check_checkpoint_dir(recipe, warn=warned.append)
    assert len(warned) == 1 and "checkpoint.dir=" in warned[0] and "checkpoint.keep_last=2" in warned[0]
    assert "3 of about" in warned[0]
    warned.clear()
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(free=3 * one))
    preflight.check_checkpoint_dir(recipe, warn=warned.append)
    assert warned == []


def test_checkpoint_size_estimate_matches_what_a_save_writes():
    from v2pe_megatron.config import PRESETS
    from v2pe_megatron.plan import checkpoint_bytes, parameter_count

    m = _tiny().model
    n = parameter_count(m)
    # fp32: weights + Adam's two moments; the distributed optimizer also writes its fp32 main weights
    # (tiny, measured: 4.48 MB without, 5.95 MB with, for 0.34M parameters + the padded vocabulary)
    assert checkpoint_bytes(m) == 12 * n
    assert checkpoint_bytes(m, distributed_optimizer=True) == 16 * n
    assert checkpoint_bytes(m, optimizer="sgd") == 4 * n
    big = load_recipe(None, ["model.preset=internvl2-2b", "model.dtype=bf16"]).model
    assert checkpoint_bytes(big, distributed_optimizer=True) == 14 * parameter_count(big)
    assert "internvl2-2b" in PRESETS


# ---------------------------------------------------------------------------------------------
# Machine: NCCL, Transformer Engine
# ---------------------------------------------------------------------------------------------
def test_nccl_without_cuda_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(PreflightError, match="launcher.backend=nccl needs CUDA.*launcher.backend=auto"):
        preflight.check_runtime(_tiny("launcher.backend=nccl"))


def test_te_spec_without_transformer_engine_is_refused():
    from v2pe_megatron.parallel.layout import have_transformer_engine

    import torch

    if torch.cuda.is_available() and have_transformer_engine():
        pytest.skip("this machine runs Transformer Engine")
    with pytest.raises(PreflightError, match="model.spec=te needs CUDA and transformer-engine.*model.spec=auto or local"):
        preflight.check_runtime(_tiny("model.spec=te"))


@pytest.mark.slow
def test_preflight_imports_no_torch_for_the_defaults(tmp_path):
    # a fresh interpreter: what the checks import, the ranks' start-up and a finished run's exit do not pay
    import subprocess

    code = ("import sys; from v2pe_megatron import preflight; from v2pe_megatron.config import load_recipe; "
            f"r = load_recipe({str(TINY)!r}, ['checkpoint.dir={tmp_path / 'ck'}']); "
            f"assert preflight.check_training(r, {str(TINY)!r}) is None; "
            "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# Tokenizer and placeholders
# ---------------------------------------------------------------------------------------------
def test_tokenizer_ids_other_than_the_models_are_refused():
    with pytest.raises(PreflightError, match=r"model.img_context_token_id=9 but the tokenizer has 7.*data.tokenizer_path"):
        preflight.check_tokenizer(_tiny("model.img_context_token_id=9"))
    with pytest.raises(PreflightError, match=r"tokenizer has \d+ ids but model.language.vocab_size=100"):
        preflight.check_tokenizer(_tiny("model.language.vocab_size=100"))
    preflight.check_tokenizer(_tiny())


def test_unreadable_tokenizer_file_is_refused(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(PreflightError, match=r"data.tokenizer_path=.*cannot be read as a sentencepiece model"):
        preflight.check_tokenizer(_tiny(f"data.tokenizer_path={bad}"))


@pytest.mark.parametrize("name", ["internvl2_2b_32k", "internvl2_2b_256k", "internvl2_2b_1m"])
def test_2b_recipes_with_unset_placeholders_name_the_variable(name, monkeypatch):
    for var in ("V2PE_META_PATH", "V2PE_TOKENIZER", "V2PE_PRETRAINED", "V2PE_CKPT_DIR"):
        monkeypatch.delenv(var, raising=False)
    path = ROOT / "recipes" / f"{name}.yaml"
    recipe = load_recipe(path)  # validates anywhere (CI loads them) ...
    with pytest.raises(PreflightError) as e:  # ... but cannot train a 2B model with the tiny tokenizer
        preflight.check_training(recipe, path)
    msg = str(e.value)
    assert "data.tokenizer_path is empty (V2PE_TOKENIZER is not set)" in msg
    assert "model.img_context_token_id=92546 but the tokenizer has 7" in msg and "export V2PE_TOKENIZER=" in msg
    assert "\n" not in msg


def test_other_unset_placeholders_are_one_warning(tmp_path, monkeypatch):
    from v2pe_megatron.data.tokenizer import save_tiny_tokenizer, tiny_tokenizer

    for var in ("V2PE_META_PATH", "V2PE_TOKENIZER", "V2PE_PRETRAINED", "V2PE_CKPT_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("V2PE_TOKENIZER", str(save_tiny_tokenizer(tiny_tokenizer(), tmp_path / "tok.model")))
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("model:\n  preset: tiny\n  spec: local\ndata:\n  meta_path: ${oc.env:V2PE_META_PATH,''}\n"
                           "  tokenizer_path: ${oc.env:V2PE_TOKENIZER,''}\ncheckpoint:\n"
                           "  dir: ${oc.env:V2PE_CKPT_DIR,''}\n  pretrained: ${oc.env:V2PE_PRETRAINED,''}\n"
                           "tracking:\n  backend: none\n")
    warned: list[str] = []
    assert preflight.check_training(load_recipe(recipe_file), recipe_file, warn=warned.append) is None
    assert len(warned) == 1
    assert ("data.meta_path (V2PE_META_PATH: synthetic data), checkpoint.dir (V2PE_CKPT_DIR: no checkpoints are "
            "saved), checkpoint.pretrained (V2PE_PRETRAINED: random initial weights)") in warned[0]
    warned.clear()  # a key given on the command line is not an unset placeholder
    recipe = load_recipe(recipe_file, [f"checkpoint.dir={tmp_path / 'ck'}"])
    preflight.check_training(recipe, recipe_file, warn=warned.append)
    assert "checkpoint.dir" not in warned[0] and "data.meta_path" in warned[0]


# ---------------------------------------------------------------------------------------------
# A finished run
# ---------------------------------------------------------------------------------------------
def test_a_run_at_train_steps_is_finished(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "ckpt"
    it = fake_checkpoint(ckpt, 4)
    done = preflight.finished_run(_tiny(f"checkpoint.dir={ckpt}", "train.steps=4"))
    assert done is not None and done.iteration == 4 and done.folder == it.resolve()
    assert "tiny_cpu is complete" in done.message() and str(it.resolve()) in done.message()
    assert preflight.finished_run(_tiny(f"checkpoint.dir={ckpt}", "train.steps=3")).iteration == 4
    # more steps to go, a fresh start asked for, no checkpoint folder: not finished
    assert preflight.finished_run(_tiny(f"checkpoint.dir={ckpt}", "train.steps=5")) is None
    assert preflight.finished_run(_tiny(f"checkpoint.dir={ckpt}", "train.steps=4", "checkpoint.load=false",
                                        "checkpoint.overwrite=true")) is None
    assert preflight.finished_run(_tiny("train.steps=4")) is None


def test_a_damaged_final_checkpoint_is_not_finished(tmp_path):
    # The resume falls back to the previous checkpoint and trains the last steps again: let it.
    ckpt = tmp_path / "ckpt"
    fake_checkpoint(ckpt, 2, latest=False)
    it = fake_checkpoint(ckpt, 4)
    (it / "__0_0.distcp").write_bytes(b"x" * 60)
    assert preflight.finished_run(_tiny(f"checkpoint.dir={ckpt}", "train.steps=4")) is None
    (it / "__0_0.distcp").write_bytes(b"x" * 100)
    (it / "manifest.json").unlink()
    assert preflight.finished_run(_tiny(f"checkpoint.dir={ckpt}", "train.steps=4")) is None
    (ckpt / "latest").write_text("garbage")
    assert preflight.finished_run(_tiny(f"checkpoint.dir={ckpt}", "train.steps=4")) is None


def test_a_finished_run_names_its_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "ckpt"
    fake_checkpoint(ckpt, 4)
    run_dir = tmp_path / "runs" / "tiny_cpu"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"run_id": "abc123", "step": s, "loss": 1.0}) + "\n"
                                                   for s in range(1, 5)))
    recipe = load_recipe(TINY, [f"checkpoint.dir={ckpt}", "train.steps=4"])
    msg = preflight.finished_run(recipe).message()
    assert f"MLflow run abc123 in sqlite:///{run_dir.resolve() / 'mlflow.db'}" in msg
