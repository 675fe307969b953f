"""Checkpoint integrity without starting ranks: the manifest catches truncated, missing and extra
files before anything is unpickled; ``find_resumable`` names every damaged checkpoint and falls back
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
    (lambda d: (d / "extra.pkl").write_bytes(b"x"), "files not in the manifest: extra.pkl"),
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
