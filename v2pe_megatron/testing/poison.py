"""Planting non-finite steps in tests, and snapshotting what such a step must leave untouched.

One copy for the CPU test of the skipped update (``tests/training/test_nonfinite.py``), its GPU
counterpart (``tests/training/test_gpu_nonfinite.py``, also a part of ``tools/device_check.sh``) and
the overlapped-communication parity test (``tests/training/test_overlap.py``).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["nan_loss", "optimizer_state", "same_state"]


def nan_loss(forward_step: Callable) -> Callable:
    """``forward_step`` whose loss (and the reported loss sum) is NaN: the step's gradients are NaN."""

    def step(data_iterator, model):
        out, loss_func = forward_step(data_iterator, model)

        def poisoned(output):
            loss_sum, n, report = loss_func(output)
            report = report["lm loss"].clone()
            report[0] = float("nan")  # [loss_sum, tokens]
            return loss_sum * float("nan"), n, {"lm loss": report}

        return out, poisoned

    return step


def optimizer_state(opt) -> dict:
    """A copy of every main (fp32) weight the optimizer updates and every optimizer state value
    (Adam's moments and step), keyed by (chained optimizer, parameter index, name)."""
    out = {}
    for i, o in enumerate(getattr(opt, "chained_optimizers", [opt])):
        params = [p for g in o.optimizer.param_groups for p in g["params"]]
        for j, p in enumerate(params):
            out[(i, j, "main")] = p.detach().clone()
            for k, v in o.optimizer.state.get(p, {}).items():
                out[(i, j, k)] = v.detach().clone() if torch.is_tensor(v) else v
    return out


def same_state(a: dict, b: dict) -> bool:
    """Bit-for-bit equality of two :func:`optimizer_state` snapshots."""
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
