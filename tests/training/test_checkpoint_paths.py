"""Which folder ``checkpoint.pretrained`` (and ``load_model_weights``) reads, and the errors that
name what is wrong before any process group or model exists."""

from __future__ import annotations

import pytest

from v2pe_megatron.training.checkpointing import weights_dir


def test_folders_it_accepts(tmp_path):
    bare = tmp_path / "weights"
    bare.mkdir()
    (bare / "metadata.json").write_text("{}")
    assert weights_dir(bare) == bare
    run = tmp_path / "run"
    it = run / "iter_0000012"
    it.mkdir(parents=True)
    (it / "metadata.json").write_text("{}")
    (run / "latest").write_text("12\n")
    assert weights_dir(it) == it
    assert weights_dir(run) == it  # a training folder: its latest complete iteration


def test_what_it_refuses(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights_dir(tmp_path / "nope")
    (tmp_path / "f.pt").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        weights_dir(tmp_path / "f.pt")
    with pytest.raises(ValueError, match="not a torch_dist checkpoint"):
        weights_dir(tmp_path)
    (tmp_path / "latest").write_text("7")
    with pytest.raises((RuntimeError, ValueError, OSError)):  # 'latest' names no checkpoint
        weights_dir(tmp_path)
