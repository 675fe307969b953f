"""What the command-line tools share; torch-free, so ``--help`` and argument errors stay instant."""

from __future__ import annotations

import argparse
import os
from fractions import Fraction


def under_launcher() -> bool:
    """This process is one rank that torchrun or srun started (it must not start ranks itself)."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def launch_rank() -> int:
    """This process's rank under torchrun / srun, 0 when started by hand."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def delta(text: str) -> float:
    """An argparse type for a V2PE delta: ``1``, ``0.0625`` or ``1/16`` -> float in (0, 1], the
    spellings ``v2pe-eval`` prints and takes."""
    try:
        v = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"delta {text!r} is not a number or a fraction like 1/16")
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"delta {text} must be in (0, 1]")
    return v
