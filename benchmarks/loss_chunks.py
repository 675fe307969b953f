"""Peak resident memory of the loss with and without ``model.loss_chunk_tokens``: one
forward+backward of a one-layer LLM with a large vocabulary (so the logits dominate), CPU, one
process. The peak is the kernel's VmHWM (reset via /proc/self/clear_refs) minus the resident size
before the step; glibc serves large blocks with mmap so freed tensors leave at once.

    .venv/bin/python benchmarks/loss_chunks.py [--seq 4096] [--vocab 32768] [--chunks 0 1024 256]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import release_memory, reset_peak, status_kib  # noqa: E402



def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 1024, 256])
    args = ap.parse_args(argv)

    from v2pe_megatron.model.language import build_language_model
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing.tiny import layout_of, tiny_recipe

    torch.set_num_threads(2)
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD
    recipe = tiny_recipe(f"data.seq_length={args.seq}", "model.language.num_layers=1",
                         f"model.language.vocab_size={args.vocab}", f"model.language.hidden_size={args.hidden}",
                         f"model.language.max_position_embeddings={args.seq}")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (1, args.seq), generator=g)
    labels = torch.randint(0, args.vocab, (1, args.seq), generator=g)
    pos = torch.arange(args.seq, dtype=torch.float64)[None]
    logits_mib = args.seq * args.vocab * 4 / 2**20
    print(f"one-layer LLM, hidden {args.hidden}, vocab {args.vocab}, {args.seq} tokens, fp32, CPU; whole logits "
          f"[{args.seq}, 1, {args.vocab}] = {logits_mib:.0f} MiB")
    print("| loss_chunk_tokens | peak MiB above the built model | seconds | loss sum |")
    print("|---|---|---|---|")
    with model_parallel():
        model = build_language_model(recipe.model.language, layout_of(recipe))
        for chunk in args.chunks:
            model.loss_chunk_tokens = chunk  # the same weights for every setting
            model.zero_grad(set_to_none=True)
            release_memory()
            base = status_kib("VmRSS")
            reset_peak()
            t0 = time.perf_counter()
            loss = model(tokens, pos, labels=labels).sum()
            loss.backward()
            seconds = time.perf_counter() - t0
            peak = (status_kib("VmHWM") - base) / 1024
            print(f"| {chunk or 'whole'} | {peak:.0f} | {seconds:.2f} | {loss.item():.4f} |")
            del loss


if __name__ == "__main__":
    main()
