"""Shared pytest setup: `gpu`-marked tests skip without CUDA; quiet, single-threaded torch."""

from __future__ import annotations

import os
import warnings

import pytest

# Tests run tiny models on a 2-core machine, often several ranks at once: one thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|absl).*")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu-marked)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
