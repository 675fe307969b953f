"""The planner against measurement, and its tables for InternVL2-2B at 32K, 256K and 1M.

1. Activations + logits: bytes the model really saves for backward (autograd saved-tensor hooks,
   one forward + masked loss, local spec on CPU, fp32, per CP rank) next to ``plan.activation_bytes``
   on its ``cpu`` path, for the tiny and a mid-size InternVL at several lengths, CP sizes (gloo
   ranks) and recompute settings. The same points are asserted within 10% by
   ``tests/test_plan_measured.py``.
2. ``v2pe-plan`` for InternVL2-2B: 32K on 32 x 80 GiB, 256K and 1M on 64 x 80 GiB, 1M on one GPU.

    .venv/bin/python benchmarks/plan_memory.py [--skip-measure]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CP1 = [(m, t, n, r) for m, t, n in (("tiny", 512, 4), ("tiny", 2048, 16), ("mid", 512, 4), ("mid", 2048, 16),
                                    ("mid", 8192, 64))
       for r in ("none", "selective", "full")]
CPN = {2: [(m, 2048, 16, r) for m in ("tiny", "mid") for r in ("none", "selective", "full")],
       4: [("tiny", 4096, 32, r) for r in ("none", "full")] + [("mid", 4096, 32, r) for r in ("none", "full")]}


def _points(cases):
    import torch

    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing.saved_memory import measured_vs_planned

    torch.set_num_threads(1)
    cp = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    with model_parallel(cp=cp, seed=1):
        return [measured_vs_planned(m, tokens=t, tiles=n, recompute=r) for m, t, n, r in cases]


def measure() -> None:
    from v2pe_megatron.testing.distributed import run_distributed

    rows = _points(CP1)
    for cp, cases in CPN.items():
        rows += [p for rank in run_distributed(_points, cp, cases, timeout=1800) for p in rank]
    print("saved for backward (MiB, per rank) vs planned (plan.activation_bytes, path cpu): local spec, fp32, CPU")
    print("| model | tokens | tiles | cp | rank | recompute | measured MiB | planned MiB | planned/measured |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in rows:
        print(f"| {p['model']} | {p['tokens']} | {p['tiles']} | {p['cp']} | {p['rank']} | {p['recompute']} | "
              f"{p['measured'] / 2**20:.3f} | {p['planned'] / 2**20:.3f} | {p['ratio']:.4f} |")
    worst = max(rows, key=lambda p: abs(p["ratio"] - 1))
    print(f"worst point: {worst['model']} {worst['tokens']} tokens cp={worst['cp']} {worst['recompute']}: "
          f"{worst['ratio'] - 1:+.2%} (pixels held: {worst['pixel_tiles']} of {worst['tiles']} tiles)")


def tables() -> None:
    from v2pe_megatron.plan import format_plan, plan

    for seq, gpus, chunk in ((32768, 32, 0), (262144, 64, 2048), (1 << 20, 64, 2048), (1 << 20, 1, 2048)):
        print(f"\n$ v2pe-plan --model internvl2-2b --seq {seq} --gpus {gpus} --gpu-mem 80"
              + (f" --loss-chunk-tokens {chunk}" if chunk else "") + " --top 5")
        print(format_plan(plan("internvl2-2b", seq, gpus, 80, loss_chunk_tokens=chunk), top=5))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-measure", action="store_true", help="only the planner's tables")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if not args.skip_measure:
        measure()
    tables()
    print(f"# {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
