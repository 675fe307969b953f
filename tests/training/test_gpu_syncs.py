"""On CUDA: host syncs per step of the real training loop (``v2pe-train``'s ``training.loop.train``),
counted by the device (``torch.cuda.set_sync_debug_mode``, ``testing.step_syncs``) over the steps
after a warm-up, by phase and call site: none in the model's forward and backward (nor in the
batch preparation and the data loader that feed it); the others (the optimizer's grad-norm reads,
the loss sum, the stop decision) are printed, not asserted. The CPU counterpart is
``test_host_syncs.py`` (the step alone, counted on the CPU; it also proves the count does not grow
with layers or sub-samples). Run as a script it does the same on the CPU (``HostSyncCounter``; host
work on host tensors counts there, so only the forward/backward must be 0): the dry run's line.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu.yaml"
# What part 1 of tools/device_check.sh trains (bf16, distributed optimizer, chunked loss), no tracking.
OVERRIDES = ["launcher.nproc_per_node=1", "tracking.backend=none", "model.dtype=bf16",
             "parallel.use_distributed_optimizer=true", "model.loss_chunk_tokens=64", "train.steps=8",
             "train.log_interval=4"]
WARMUP = 3


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def count(backend: str) -> dict:
    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.testing.step_syncs import count_step_syncs, format_report

    recipe = load_recipe(str(RECIPE), OVERRIDES + [f"launcher.backend={backend}"])
    res = count_step_syncs(recipe, warmup=WARMUP)
    print("\n" + format_report(res), flush=True)
    return res


def check(res: dict, *, cuda: bool) -> None:
    from v2pe_megatron.testing.step_syncs import MODEL_PHASES, format_report

    assert res["steps"] == 8 - WARMUP - 1, res
    # the counter is not blind: one read-back per counted step, and the one inside a backward hook
    # (on CUDA raised on autograd's device thread)
    assert res["probe_steps"] == res["steps"] and res["probe_backward"] >= 1, format_report(res)
    must_be_zero = MODEL_PHASES if cuda else ("forward/backward",)
    assert sum(res["per_step"].get(p, 0.0) for p in must_be_zero) == 0, format_report(res)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_step_forward_backward_has_no_host_sync(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", _free_port())
    res = count("nccl")
    assert res["backend"] == "cuda sync-debug"
    check(res, cuda=True)


if __name__ == "__main__":  # CPU equivalent (gloo, HostSyncCounter): tools/device_check.sh --dry-run
    os.environ.setdefault("MASTER_PORT", _free_port())
    check(count("gloo"), cuda=False)
