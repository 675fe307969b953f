"""Shared pytest setup: `gpu`-marked tests skip without CUDA; multi-rank tests must be `slow`-marked;
quiet, single-threaded torch."""

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


def pytest_runtest_setup(item):
    # Before any fixture of the test (module-scoped ones too): run_distributed refuses to start ranks
    # for a test that is not marked slow, so that `-m 'not slow'` stays the quick loop.
    if item.get_closest_marker("slow") is not None:
        os.environ["V2PE_TEST_MARKED_SLOW"] = "1"
    else:
        os.environ.pop("V2PE_TEST_MARKED_SLOW", None)
