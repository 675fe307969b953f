"""A disk that fills up during a save (issue 22, item 7). What a user saw: megatron's writer logs
``[enforce fail at inline_container.cc:672] unexpected pos`` (torch's zip writer on a short write;
megatron re-raises it as ``Worker failure ... <class 'RuntimeError'>``, the ``OSError`` dropped), "No
space left on device" nowhere, and the half-written ``iter_*.tmp`` kept the disk at 100%.

Here the operating system's part is played by the file object megatron's writer opens: its writes
fail with ENOSPC once the "disk" is full, exactly as ``write(2)`` does; everything above it (torch's
zip writer, megatron's writer and CheckpointException, our save) is the real code. The free space the
save measures afterwards is the fake disk's. (Seen the same on a real 4 MiB tmpfs.)"""

from __future__ import annotations

import errno
import io
import os
import shutil
from collections import namedtuple

import pytest
import torch

from v2pe_megatron.training import checkpointing as ckpt

_Usage = namedtuple("_Usage", "total used free")


class _FullDisk(io.FileIO):
    """A file on a disk with ``left[0]`` bytes free: a write past it writes nothing and fails with
    ENOSPC, as the kernel's does."""

    left = [0]

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        if n > self.left[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left[0] -= n
        return super().write(b)


def test_disk_full_names_the_cause_and_sizes_removes_the_partial_folder_keeps_the_previous(tmp_path, monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing import tiny
    from v2pe_megatron.training.engine import build_optimizer, wrap_ddp

    recipe = tiny.tiny_recipe()
    root = tmp_path / "ckpt"
    with model_parallel(1, 1, seed=3):
        model = tiny.build_language_model(recipe)
        ddp = wrap_ddp(model, model.config, use_distributed_optimizer=False)
        opt = build_optimizer(recipe.optimizer, [ddp], params_dtype=torch.float32, use_distributed_optimizer=False)
        first = ckpt.save_checkpoint(root, 1, [ddp], opt)
        size = sum(f.stat().st_size for f in first.iterdir())

        _FullDisk.left[0] = size // 3  # the second save fills the disk a third of the way in
        real_open = open
        monkeypatch.setattr(filesystem_async, "open", lambda name, mode="r", *a, **k: io.BufferedWriter(
            _FullDisk(name, "wb")) if "w" in mode else real_open(name, mode, *a, **k), raising=False)
        monkeypatch.setattr(shutil, "disk_usage", lambda p: _Usage(4 * size, 3 * size, size // 3))
        with pytest.raises(ckpt.CheckpointError) as e:
            ckpt.save_checkpoint(root, 2, [ddp], opt)

    msg = str(e.value)
    assert msg.startswith(f"saving checkpoint iter_0000002 failed: no space left on device in {root} "
                          f"(the checkpoint needs at least {ckpt._gib(size)}, {ckpt._gib(size // 3)} free after "
                          f"removing the partial iter_0000002.tmp). The previous checkpoint {first} is kept"), msg
    assert e.value.collective  # megatron's writer raises it on every rank: the CLI says it once
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000001", "latest"]  # no partial folder
    assert (root / "latest").read_text() == "1" and ckpt.verify(first) is None


def test_other_save_failures_stay_what_they_are(tmp_path):
    """Only a full disk is rewritten; the partial folder goes in any case."""
    tmp = tmp_path / "iter_0000003.tmp"
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_bytes(b"partial")
    boom = ValueError("a bug")
    assert ckpt._failed_save(boom, tmp_path, tmp, needed=10) is boom
    assert not tmp.exists()
    enospc = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    enospc.__context__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # torch.save on a file object
    err = ckpt._failed_save(enospc, tmp_path, tmp, needed=10)
    assert isinstance(err, ckpt.CheckpointError) and "no space left on device" in str(err)
    assert "No earlier checkpoint exists" in str(err) and not err.collective
