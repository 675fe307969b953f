"""Peak resident memory and time per rank of one forward+backward step of the tiny-shaped language
model under context parallelism (gloo, CPU), at several pack lengths and CP sizes.

Measured inside each rank: the kernel's resident-set high-water mark (VmHWM) is reset through
/proc/self/clear_refs before the step, and the step's peak is VmHWM minus the resident size just
before it (model, optimizer-free, already built). glibc is told to serve large blocks with mmap so
that freed activations go back to the OS between measurements. Every CP size uses the blockwise
ring attention (``RingCoreAttention``; at CP=1 a ring of one), so the comparison isolates what CP
buys; the packs are the same for every CP size: sub-samples of random lengths (V2PE-style
fractional positions restarting per sub-sample), padded to multiples of 8.

    .venv/bin/python benchmarks/cp_memory.py [--lengths 4096 8192 16384 32768] [--cp 1 2 4]

The last line is ``CP2/CP1 peak-memory ratio at <length>: <ratio>`` for the largest length.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import release_memory, reset_peak, status_kib  # noqa: E402

PAD = 8  # every sub-sample splits into 2*cp chunks for cp up to 4




def make_pack(length: int, max_sub: int, seed: int):
    """One [1, length] pack of sub-samples in [max_sub/4, max_sub] tokens, padded to PAD, plus a tail."""
    rng = np.random.default_rng(seed)
    lens, used = [], 0
    while True:
        n = int(rng.integers(max_sub // 4, max_sub + 1))
        lp = -(-n // PAD) * PAD
        if used + lp > length:
            break
        lens.append(lp)
        used += lp
    if used < length:
        lens.append(length - used)
    pos = np.concatenate([np.cumsum(np.where(rng.random(n) < 0.5, 0.25, 1.0)) - 0.25 for n in lens])
    tokens = torch.from_numpy(rng.integers(10, 500, (1, length + 1)))
    from v2pe_megatron.parallel.batch import MicroBatch

    return MicroBatch(tokens=tokens[:, :-1], labels=tokens[:, 1:],
                      loss_mask=torch.from_numpy((rng.random((1, length)) > 0.3).astype(np.float32)),
                      position_ids=torch.from_numpy(pos[None].astype(np.float64)),
                      seq_lens=[torch.tensor(lens, dtype=torch.int32)])


def bench_rank(lengths: list[int], layers: int, max_sub: int) -> list[dict]:
    from megatron.core import parallel_state as ps

    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.model.attention import RingCoreAttention
    from v2pe_megatron.model.language import LanguageModel, language_transformer_config
    from v2pe_megatron.model.specs import block_spec, layer_spec
    from v2pe_megatron.parallel.packed_seq import split_batch_for_cp
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing.tiny import layout_of

    torch.set_num_threads(1)
    try:  # large blocks via mmap: freed activations leave the resident set at once
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD
    except OSError:
        pass
    cp = torch.distributed.get_world_size()
    recipe = load_recipe(None, ["model.preset=tiny", f"data.seq_length={max(lengths)}",
                                f"parallel.cp={cp}", f"model.language.num_layers={layers}"])
    out = []
    with model_parallel(cp=cp, seed=1):
        lm = recipe.model.language
        cfg = language_transformer_config(lm, layout_of(recipe))
        model = LanguageModel(cfg, block_spec("local", cfg, layer_spec("local", core_attention=RingCoreAttention)),
                              vocab_size=lm.vocab_size, max_sequence_length=lm.max_position_embeddings,
                              rotary_base=lm.rotary_base)
        rank = ps.get_context_parallel_rank()

        def step(batch) -> float:
            local = split_batch_for_cp(batch, cp_size=cp, cp_rank=rank)
            t0 = time.perf_counter()
            loss = model(local.tokens, local.position_ids, labels=local.labels,
                         packed_seq_params=local.packed_seq_params)
            (loss * local.loss_mask).sum().backward()
            return time.perf_counter() - t0

        step(make_pack(1024, max_sub, 0))  # warm-up: lazy allocations, gradient tensors
        for length in lengths:
            batch = make_pack(length, max_sub, length)
            release_memory()
            torch.distributed.barrier()
            base = status_kib("VmRSS")
            reset_peak()  # reset VmHWM to the current RSS
            seconds = step(batch)
            peak = status_kib("VmHWM") - base
            torch.distributed.barrier()
            out.append({"length": length, "cp": cp, "rank": rank, "peak_mib": peak / 1024, "seconds": seconds})
            del batch
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layers", type=int, default=2, help="language layers (tiny preset shapes otherwise)")
    ap.add_argument("--max-sub-sample", type=int, default=4096, help="longest sub-sample in a pack")
    args = ap.parse_args(argv)
    if 2 not in args.cp or 1 not in args.cp:
        ap.error("--cp must include 1 and 2 (the last line is their ratio)")
    from v2pe_megatron.testing.distributed import run_distributed

    rows: dict[tuple[int, int], dict] = {}
    for cp in args.cp:
        t0 = time.perf_counter()
        per_rank = run_distributed(bench_rank, cp, args.lengths, args.layers, args.max_sub_sample, timeout=1800)
        for length in args.lengths:
            recs = [r for rank in per_rank for r in rank if r["length"] == length]
            rows[(length, cp)] = {"peak": max(r["peak_mib"] for r in recs), "sec": max(r["seconds"] for r in recs)}
        print(f"# cp={cp}: {time.perf_counter() - t0:.0f} s wall", file=sys.stderr, flush=True)

    cps = args.cp
    print(f"tiny-shaped LM ({args.layers} layers, hidden 64, 4 heads / 2 KV heads, vocab 512), fp32, gloo, "
          f"1 thread per rank; packs of sub-samples <= {args.max_sub_sample} tokens; one forward+backward")
    print("peak resident memory per rank above the built model (MiB, max over ranks) and step time per rank (s)")
    head = "| length | " + " | ".join(f"CP{c} MiB" for c in cps) + " | " + " | ".join(
        f"CP{c}/CP1" for c in cps if c != 1) + " | " + " | ".join(f"CP{c} s" for c in cps) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for length in args.lengths:
        base = rows[(length, 1)]["peak"]
        print(f"| {length} | " + " | ".join(f"{rows[(length, c)]['peak']:.1f}" for c in cps) + " | "
              + " | ".join(f"{rows[(length, c)]['peak'] / base:.2f}" for c in cps if c != 1) + " | "
              + " | ".join(f"{rows[(length, c)]['sec']:.2f}" for c in cps) + " |")
    print("time growth per doubling of the length (t(L)/t(L/2)): " + "; ".join(
        f"CP{c}: " + " ".join(f"{rows[(b, c)]['sec'] / rows[(a, c)]['sec']:.2f}"
                              for a, b in zip(args.lengths, args.lengths[1:])) for c in cps))
    top = max(args.lengths)
    print(f"CP2/CP1 peak-memory ratio at {top}: {rows[(top, 2)]['peak'] / rows[(top, 1)]['peak']:.2f}")


if __name__ == "__main__":
    main()
