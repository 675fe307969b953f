"""Checkpoint integrity without starting ranks: the manifest catches truncated and missing files
before anything is unpickled (a stray file it does not list is named and ignored); ``find_resumable`` names every damaged checkpoint and falls back
to the newest complete one, also when ``latest`` is garbage or was deleted; stale ``.tmp`` folders
are removed explicitly; keep_last prunes only the run's own lineage."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from v2pe_megatron.training import checkpointing as ckpt


def _fake_checkpoint(root: Path, it: int) -> Path:
    d = ckpt.iteration_dir(root, it)
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(b"x" * 1000 + bytes([it]))
    (d / ".metadata").write_bytes(b"metadata")
    (d / "common.pt").write_bytes(b"common")
    ckpt.write_manifest(d)
    (root / "latest").write_text(str(it))
    return d


@pytest.fixture
def two(tmp_path):
    _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 8)
    return tmp_path


def test_complete_checkpoint_verifies(two):
    assert ckpt.verify(ckpt.iteration_dir(two, 8)) is None
    assert ckpt.find_resumable(two) == 8


@pytest.mark.parametrize("damage, why", [
    (lambda d: (d / "__0_0.distcp").write_bytes(b"x" * 10), "__0_0.distcp has 10 bytes"),
    (lambda d: (d / ".metadata").unlink(), ".metadata is missing"),
    (lambda d: (d / ".metadata").write_bytes(b"evil!!!!"), ".metadata does not match its sha256"),
    (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    (lambda d: (d / "manifest.json").write_text("{garbage"), "unreadable manifest.json"),
])
def test_damaged_latest_is_named_and_previous_used(two, caplog, damage, why):
    damage(ckpt.iteration_dir(two, 8))
    with caplog.at_level(logging.WARNING, logger="v2pe_megatron.train"):
        assert ckpt.find_resumable(two) == 4
    assert f"skipping damaged checkpoint {ckpt.iteration_dir(two, 8)}: {why}" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match="iter_0000008 is damaged"):
        ckpt.load_checkpoint(two, [None], iteration=8)  # refused before megatron reads a byte


@pytest.mark.parametrize("latest", ["garbage\n", "", "12", None])
def test_bad_or_missing_latest_falls_back_to_newest_complete(two, caplog, latest):
    if latest is None:
        (two / "latest").unlink()
    else:
        (two / "latest").write_text(latest)
    with caplog.at_level(logging.WARNING, logger="v2pe_megatron.train"):
        assert ckpt.find_resumable(two) == 8  # never a silent start from scratch
    assert "latest" in caplog.text


def test_nothing_usable_is_an_error_naming_each(two):
    for it in (4, 8):
        (ckpt.iteration_dir(two, it) / ".metadata").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"iter_0000008: \.metadata is missing; .*iter_0000004"):
        ckpt.find_resumable(two)


def test_empty_folder_means_fresh_start(tmp_path):
    assert ckpt.find_resumable(tmp_path) is None


def test_stale_tmp_folders_are_removed_and_logged(two, caplog):
    (two / "iter_0000012.tmp").mkdir()
    (two / "iter_0000012.tmp" / "__0_0.distcp").write_bytes(b"partial")
    with caplog.at_level(logging.INFO, logger="v2pe_megatron.train"):
        assert ckpt.clean_stale_tmp(two) == ["iter_0000012.tmp"]
    assert not (two / "iter_0000012.tmp").exists() and "iter_0000012.tmp" in caplog.text
    assert ckpt.saved_iterations(two) == [4, 8]


def test_hashing_is_spread_over_the_ranks():
    """After a save each rank hashes what it wrote (torch_dist's ``__<rank>_<n>.distcp``), the few
    other files go round-robin; verifying deals the files out by size, largest first."""
    names = ["__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "__3_0.distcp", ".metadata", "metadata.json"]
    assert ckpt._hashed_by(names, 2) == [["__0_0.distcp", "__0_1.distcp", "__3_0.distcp", "metadata.json"],
                                         ["__1_0.distcp", ".metadata"]]
    sizes = {"a": {"size": 100}, "b": {"size": 60}, "c": {"size": 50}, "d": {"size": 10}, "e": {"size": 1}}
    dealt = ckpt._dealt_by_size(sizes, 2)
    assert dealt == [["a", "d", "e"], ["b", "c"]]  # 111 and 110 bytes
    assert sorted(n for part in ckpt._dealt_by_size(sizes, 4) for n in part) == sorted(sizes)


@pytest.mark.parametrize("stray", ["notes.txt", ".DS_Store", "sub/extra.pkl"])
def test_a_stray_file_is_named_not_a_damage(two, caplog, stray):
    """A file the manifest does not list is never read by a load: the checkpoint stays usable."""
    d = ckpt.iteration_dir(two, 8)
    (d / stray).parent.mkdir(exist_ok=True)
    (d / stray).write_text("my notes")
    with caplog.at_level(logging.WARNING, logger="v2pe_megatron.train"):
        assert ckpt.find_resumable(two) == 8
    assert f"{d}: ignoring 1 file(s) the manifest does not list" in caplog.text and stray in caplog.text
    assert "damaged" not in caplog.text


def test_latest_behind_a_newer_complete_checkpoint_is_used_with_a_warning(two, caplog):
    """A save stopped between its rename and the update of ``latest`` (or ``latest`` set back by
    hand): ``latest`` is followed, and the warning says which one, why, and how to take the newer."""
    (two / "latest").write_text("4")
    with caplog.at_level(logging.WARNING, logger="v2pe_megatron.train"):
        assert ckpt.find_resumable(two) == 4
    text = caplog.text
    assert f"names iteration 4, but {ckpt.iteration_dir(two, 8)} is newer and complete" in text
    assert "using iteration 4, as latest says" in text and f"write 8 into {two / 'latest'}" in text
    caplog.clear()
    (ckpt.iteration_dir(two, 8) / "__0_0.distcp").write_bytes(b"x")  # a newer but damaged one: no word
    with caplog.at_level(logging.WARNING, logger="v2pe_megatron.train"):
        assert ckpt.find_resumable(two) == 4
    assert "newer" not in caplog.text


def test_nothing_usable_is_said_once(two, caplog):
    """When nothing verifies, the error names every checkpoint and why; no warning repeats it."""
    for it in (4, 8):
        (ckpt.iteration_dir(two, it) / ".metadata").unlink()
    with caplog.at_level(logging.WARNING, logger="v2pe_megatron.train"):
        with pytest.raises(ckpt.CheckpointError) as e:
            ckpt.find_resumable(two)
    assert e.value.collective  # the same on every rank: the CLI says it from rank 0 only
    assert "iter_0000008: .metadata is missing" in str(e.value) and ".metadata is missing" not in caplog.text


def test_quick_verification_reads_only_the_small_files(two):
    """Before the run (``contents=False``) the data files are checked by size, the small ones by
    hash: enough to unpickle the metadata safely; the run's own check hashes everything."""
    d = ckpt.iteration_dir(two, 8)
    data = d / "__0_0.distcp"
    data.write_bytes(b"y" + data.read_bytes()[1:])  # same size, other bytes
    assert ckpt.verify(d, contents=False) is None
    assert "__0_0.distcp does not match its sha256" in ckpt.verify(d)
    (d / ".metadata").write_bytes(b"evil!!!!")
    assert ".metadata does not match its sha256" in ckpt.verify(d, contents=False)


def test_a_folder_given_by_name_is_verified_and_a_training_folder_falls_back(two, caplog):
    """What ``load_model_weights`` (eval's --ckpt, checkpoint.pretrained) and ``export-hf`` read:
    the rule a resume follows (item 10 of issue 22: a truncated latest gave ``EOFError``)."""
    for it in (4, 8):
        (ckpt.iteration_dir(two, it) / "metadata.json").write_text("{}")
        ckpt.write_manifest(ckpt.iteration_dir(two, it))
    assert ckpt.checkpoint_folder(two) == ckpt.iteration_dir(two, 8)
    (ckpt.iteration_dir(two, 8) / ".metadata").write_bytes(b"trunc")  # a truncated latest
    with caplog.at_level(logging.WARNING, logger="v2pe_megatron.train"):
        assert ckpt.checkpoint_folder(two) == ckpt.iteration_dir(two, 4)
    assert f"skipping damaged checkpoint {ckpt.iteration_dir(two, 8)}: .metadata has 5 bytes" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match=r"iter_0000008 is damaged: \.metadata has 5 bytes"):
        ckpt.checkpoint_folder(ckpt.iteration_dir(two, 8))  # named by the user: no other one instead
    plain = two / "weights"  # save_model_weights' folders have no manifest: read as they are
    plain.mkdir()
    (plain / "metadata.json").write_text("{}")
    assert ckpt.checkpoint_folder(plain) == plain


def test_v2pe_train_says_no_usable_checkpoint_once(two, capsys, monkeypatch):
    """Found before any rank starts; one line (it used to come once per rank, after the warnings
    that said the same)."""
    from pathlib import Path as _P

    from v2pe_megatron.cli.train import main

    monkeypatch.setattr("v2pe_megatron.runtime.launch.run_local", lambda *a, **k: pytest.fail("ranks started"))
    for it in (4, 8):
        (ckpt.iteration_dir(two, it) / ".metadata").unlink()
    recipe = _P(__file__).resolve().parents[2] / "recipes" / "tiny_cpu.yaml"
    assert main([str(recipe), f"checkpoint.dir={two}"]) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith(f"v2pe-train: no usable checkpoint in {two}: "), err
    assert "iter_0000008: .metadata is missing" in err[0] and "iter_0000004: .metadata is missing" in err[0]


def test_a_parent_that_starts_gpu_ranks_leaves_the_model_check_to_them(monkeypatch):
    """megatron's layers make a CUDA context even for a meta build: a launcher parent would hold one
    on GPU 0 all run. Its ranks run the same check first thing."""
    import torch

    from v2pe_megatron.cli.checkpoint_check import checks_here

    for var in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not checks_here(2) and checks_here(1)
    monkeypatch.setenv("RANK", "1")
    assert checks_here(2)
    monkeypatch.delenv("RANK")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert checks_here(2)


def test_garbage_latest_without_checkpoints_is_a_fresh_start_before_the_run_too(tmp_path):
    """The check before the run decides as the run does: nothing to resume is no error."""
    from v2pe_megatron.config import load_recipe

    (tmp_path / "latest").write_text("garbage")
    ckpt.check_recipe_checkpoint(load_recipe(None, [f"checkpoint.dir={tmp_path}"]))  # no error, nothing built
