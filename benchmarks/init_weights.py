"""Cost of the layout-invariant initial weights (``training/init_weights.py``), CPU, one process.

1. ``initialize`` on a model with InternVL2-2B's LLM widths (hidden 2048, ffn 8192, 16 heads, 8 KV
   groups, vocabulary 92553) but ``--layers`` layers (default 2, ~0.5 B parameters, ~2 GB in fp32): wall
   time per GB of values drawn, for each ``--threads``, and the init's peak resident memory on top of
   the built model (VmHWM after a reset, minus VmRSS before).
2. One InternVL2-2B LLM layer's weights: the whole tensors against TP rank 3 of 8's shards
   (``values`` of the shard's region), to show that a rank draws its shard, not the whole tensor.

    .venv/bin/python benchmarks/init_weights.py [--layers 2] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import release_memory, reset_peak, status_kib  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)

    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing.tiny import layout_of, tiny_recipe
    from v2pe_megatron.training.init_weights import Init, initialize, values

    torch.set_num_threads(1)
    h, ffn, heads, groups, vocab = 2048, 8192, 16, 8, 92553
    recipe = tiny_recipe(f"model.language.num_layers={args.layers}", f"model.language.hidden_size={h}",
                         f"model.language.ffn_hidden_size={ffn}", f"model.language.num_attention_heads={heads}",
                         f"model.language.num_query_groups={groups}", f"model.language.vocab_size={vocab}")
    with open("/proc/loadavg") as f:
        print(f"load average at start: {f.read().split()[:3]}")
    with model_parallel(seed=1):
        model = build_model(recipe.model, layout_of(recipe))
        n = sum(p.numel() for p in model.parameters())
        print(f"model: {args.layers} layers at InternVL2-2B LLM widths + tiny ViT: {n / 1e6:.0f} M parameters, "
              f"{n * 4 / 1e9:.2f} GB fp32")
        for threads in args.threads:
            release_memory()
            before = status_kib("VmRSS")
            reset_peak()
            rep = initialize(model, 7, threads=threads)
            extra = (status_kib("VmHWM") - before) / 1024
            gb = rep.drawn * 4 / 1e9
            print(f"threads {threads}: {rep.seconds:.2f} s for {gb:.2f} GB drawn -> {rep.seconds / gb:.2f} s/GB; "
                  f"peak extra resident {extra:.1f} MiB (largest band {rep.largest_band_bytes / 2**20:.1f} MiB "
                  f"x {threads} threads)")
        del model

    # One LLM layer of InternVL2-2B at TP=8: rank 3's shard of each weight vs the whole tensor.
    tp, rank = 8, 3
    kv = h // heads * groups
    shapes = {"linear_qkv": ((h + 2 * kv, h), 0), "linear_proj": ((h, h), 1),
              "linear_fc1": ((2 * ffn, h), 0), "linear_fc2": ((h, ffn), 1)}
    whole = shard = 0.0
    for name, (shape, axis) in shapes.items():
        t0 = time.perf_counter()
        values(7, name, Init("normal", 0.02), shape)
        t1 = time.perf_counter()
        part = shape[axis] // tp
        region = [slice(None), slice(None)]
        region[axis] = slice(rank * part, (rank + 1) * part)
        values(7, name, Init("normal", 0.02), shape, tuple(region))
        t2 = time.perf_counter()
        whole, shard = whole + t1 - t0, shard + t2 - t1
        print(f"{name} {shape}: whole {1e3 * (t1 - t0):.0f} ms, TP rank {rank}/{tp} shard (axis {axis}) "
              f"{1e3 * (t2 - t1):.0f} ms")
    print(f"one layer: whole {whole:.2f} s, one TP={tp} shard {shard:.3f} s ({whole / shard:.1f}x less)")


if __name__ == "__main__":
    main()
