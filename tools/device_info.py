"""Part a) of tools/device_check.sh: versions and device, and proof that megatron-core and omegaconf
come from the carried wheels (``V2PE_EXPECT_SITE``) and the package from this checkout.

Last line: ``summary: ...`` (the SUMMARY line). Exits 1 when something is off, including no CUDA
under ``V2PE_REQUIRE_CUDA=1``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def main() -> int:
    import megatron.core
    import omegaconf
    import torch

    import v2pe_megatron.config  # noqa: F401  (the repo imports with only these packages)

    problems = []
    site = os.environ.get("V2PE_EXPECT_SITE")
    for mod in (megatron.core, omegaconf):
        where = Path(mod.__file__).resolve()
        print(f"{mod.__name__} {getattr(mod, '__version__', '?')} from {where.parent}")
        if site and Path(site).resolve() not in where.parents:
            problems.append(f"{mod.__name__} is not the carried wheel's ({where})")
    repo = Path(__file__).resolve().parents[1]
    pkg = Path(sys.modules["v2pe_megatron.config"].__file__).resolve()
    if repo not in pkg.parents:
        problems.append(f"v2pe_megatron imported from {pkg}, not from {repo}")
    dali = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
    te = importlib.util.find_spec("transformer_engine") is not None
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    print(f"torch {torch.__version__} CUDA {torch.version.cuda} cuda available {torch.cuda.is_available()}")
    gpu = "no GPU"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s))"
        a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        print(f"bf16 matmul on the GPU: {float((a @ a).float().abs().mean()):.3f}")
    elif os.environ.get("V2PE_REQUIRE_CUDA") == "1":
        problems.append("torch sees no CUDA device")
    print(f"GPU: {gpu}; nvidia-dali {'yes' if dali else 'no (Pillow tiling)'}; "
          f"transformer-engine {'yes' if te else 'no'}")
    for p in problems:
        print(f"PROBLEM: {p}")
    print(f"summary: torch {torch.__version__} CUDA {torch.version.cuda}, {gpu}; megatron-core "
          f"{megatron.core.__version__}, omegaconf {omegaconf.__version__}"
          f"{' from the wheels' if site else ''}; DALI {'yes' if dali else 'no'}, TE {'yes' if te else 'no'}"
          + (f"; PROBLEMS: {'; '.join(problems)}" if problems else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
