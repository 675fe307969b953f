"""The planner against measurement, and its tables for InternVL2-2B at 32K, 256K and 1M.

1. Activations + logits: bytes the model really saves for backward (autograd saved-tensor hooks,
   one forward + masked loss, local spec on CPU, fp32, per rank) next to ``plan.activation_bytes``
   on its ``local`` path, for the tiny and a mid-size InternVL at several lengths, CP sizes, TP 2 with
   and without sequence parallelism (gloo ranks) and recompute settings. The same points are asserted within 10% by
   ``tests/test_plan_measured.py``.
2. ``v2pe-plan`` for InternVL2-2B: 32K on 32 x 80 GiB, 256K and 1M on 64 x 80 GiB, 1M on one GPU.
3. ``--gpu`` (instead of 1 and 2; ``tools/device_check.sh --memory`` runs it): InternVL2-2B shapes in
   bf16 on one CUDA device at 8K and 32K tokens (half of them image tokens), each recompute setting
   the plan says fits: saved-tensor bytes, ``torch.cuda.memory_allocated`` after the forward and
   ``torch.cuda.max_memory_allocated`` over forward + backward (bare model: no optimizer or DDP
   buffers), against the plan for the spec the device resolves (te with Transformer Engine, else local).
   ``--device-memory-cpu`` runs the same code on the CPU with the tiny preset (the dry run's check).

    .venv/bin/python benchmarks/plan_memory.py [--skip-measure]
    python3 benchmarks/plan_memory.py --gpu [--seq 8192 32768]
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
# (model, tokens, tiles, recompute, sequence parallel) on tp=2 ranks
TP2 = [(m, 1024, 8, r, sp) for m in ("tiny", "mid") for sp in (False, True) for r in ("none", "selective", "full")]
CPN = {2: [(m, 2048, 16, r) for m in ("tiny", "mid") for r in ("none", "selective", "full")],
       4: [("tiny", 4096, 32, r) for r in ("none", "full")] + [("mid", 4096, 32, r) for r in ("none", "full")]}


def _tp_points(cases):
    import torch

    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing.saved_memory import measured_vs_planned

    torch.set_num_threads(1)
    with model_parallel(tp=torch.distributed.get_world_size(), seed=1):
        return [measured_vs_planned(m, tokens=t, tiles=n, recompute=r, sp=sp) for m, t, n, r, sp in cases]


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
    rows += [p for rank in run_distributed(_tp_points, 2, TP2, timeout=1800) for p in rank]
    print("saved for backward (MiB, per rank) vs planned (plan.activation_bytes, path local): local spec, fp32, CPU")
    print("| model | tokens | tiles | tp | sp | cp | rank | recompute | measured MiB | planned MiB | planned/measured |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in rows:
        print(f"| {p['model']} | {p['tokens']} | {p['tiles']} | {p['tp']} | {'yes' if p['sp'] else 'no'} | "
              f"{p['cp']} | {p['rank']} | {p['recompute']} | "
              f"{p['measured'] / 2**20:.3f} | {p['planned'] / 2**20:.3f} | {p['ratio']:.4f} |")
    worst = max(rows, key=lambda p: abs(p["ratio"] - 1))
    print(f"worst point: {worst['model']} {worst['tokens']} tokens tp={worst['tp']} cp={worst['cp']} "
          f"{worst['recompute']}: "
          f"{worst['ratio'] - 1:+.2%} (pixels held: {worst['pixel_tiles']} of {worst['tiles']} tiles)")


def tables() -> None:
    from v2pe_megatron.plan import format_plan, plan

    for seq, gpus, chunk in ((32768, 32, 0), (262144, 64, 2048), (1 << 20, 64, 0), (1 << 20, 64, 2048),
                             (1 << 20, 1, 0)):
        print(f"\n$ v2pe-plan --model internvl2-2b --seq {seq} --gpus {gpus} --gpu-mem 80"
              + (f" --loss-chunk-tokens {chunk}" if chunk else "") + " --top 5")
        print(format_plan(plan("internvl2-2b", seq, gpus, 80, loss_chunk_tokens=chunk), top=5))


def device_memory(preset: str, seqs: list[int], dtype: str, *, image_share: float = 0.5) -> list[dict]:
    """Measured vs planned memory of one forward + backward on this process's device (CUDA if present)."""
    import torch

    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import Layout, resolve_spec
    from v2pe_megatron.plan import GIB, activation_bytes, param_counts
    from v2pe_megatron.runtime.distributed import device, model_parallel
    from v2pe_megatron.testing.saved_memory import image_pack, saved_bytes
    from v2pe_megatron.training.forward import prepare_batch

    cfg = load_recipe(None, [f"model.preset={preset}", f"model.dtype={dtype}"]).model
    spec = resolve_spec("auto")
    cuda = torch.cuda.is_available()
    dev = device()
    total = torch.cuda.get_device_properties(dev).total_memory if cuda else None
    pc = param_counts(cfg)
    params = sum(pc.values()) + (cfg.language.num_layers - 1) * pc["layer"]
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    rows = []
    with model_parallel(seed=1):
        layout = Layout(spec=spec)
        for rec in ("none", "selective", "full"):
            model = None
            for seq in seqs:
                tiles = int(seq * image_share // cfg.num_image_token)
                plan = activation_bytes(cfg, tokens=seq, tiles=tiles, dtype=dtype, recompute=rec, path=spec)
                grads = params * {"fp32": 4}.get(dtype, 2)        # .grad in the parameters' dtype (no DDP here)
                planned_peak = plan.saved + plan.transient + plan.logits_transient + grads
                row = {"seq": seq, "tiles": tiles, "recompute": rec, "spec": spec, "planned_saved": plan.saved,
                       "planned_peak": planned_peak}
                if total is not None and planned_peak + params * 2 > 0.9 * total:
                    rows.append({**row, "skipped": f"plans {(planned_peak + params * 2) / GIB:.1f} GiB"})
                    print(rows[-1], flush=True)
                    continue
                if model is None:
                    model = build_model(cfg, layout, recompute=rec)
                batch = image_pack(cfg, tokens=seq, tiles=tiles, pad_multiple=layout.seq_multiple, seed=seq)
                b = prepare_batch(batch, layout, dev, torch_dtype, cfg.img_context_token_id)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if cuda else 0

                def step():
                    out = model(b.tokens, b.position_ids, b.pixel_values, labels=b.labels,
                                packed_seq_params=b.packed_seq_params, image_exchange=b.image_exchange)
                    return (out * b.loss_mask).sum()

                saved, loss = saved_bytes(step, exclude=list(model.parameters()))
                after_fwd = (torch.cuda.memory_allocated() - base) if cuda else None
                loss.backward()
                peak = (torch.cuda.max_memory_allocated() - base) if cuda else None
                del loss
                model.zero_grad(set_to_none=True)
                row.update(measured_saved=saved, after_forward=after_fwd, measured_peak=peak,
                           ratio_saved=plan.saved / saved,
                           ratio_peak=(planned_peak / peak) if peak else None)
                rows.append(row)
                print({k: (round(v / GIB, 3) if isinstance(v, (int, float)) and v > 1e6 else v)
                       for k, v in row.items()}, flush=True)
            del model
    return rows


def print_device_memory(rows: list[dict], title: str) -> None:
    print(title)
    print("| tokens | tiles | recompute | spec | saved GiB (hooks) | planned saved | planned/measured | "
          "allocated after fwd GiB | peak fwd+bwd GiB | planned peak | planned/measured |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    g = 2 ** 30
    for r in rows:
        if "skipped" in r:
            print(f"| {r['seq']} | {r['tiles']} | {r['recompute']} | {r['spec']} | skipped: {r['skipped']} "
                  f"| {r['planned_saved'] / g:.2f} | | | | {r['planned_peak'] / g:.2f} | |")
            continue
        fwd = f"{r['after_forward'] / g:.2f}" if r["after_forward"] is not None else "-"
        peak = f"{r['measured_peak'] / g:.2f}" if r["measured_peak"] is not None else "-"
        rp = f"{r['ratio_peak']:.3f}" if r["ratio_peak"] is not None else "-"
        print(f"| {r['seq']} | {r['tiles']} | {r['recompute']} | {r['spec']} | {r['measured_saved'] / g:.3f} | "
              f"{r['planned_saved'] / g:.3f} | {r['ratio_saved']:.3f} | {fwd} | {peak} | "
              f"{r['planned_peak'] / g:.2f} | {rp} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-measure", action="store_true", help="only the planner's tables")
    ap.add_argument("--gpu", action="store_true", help="CUDA: InternVL2-2B, bf16, max_memory_allocated vs plan")
    ap.add_argument("--device-memory-cpu", action="store_true", help="the --gpu code path on the CPU, tiny preset")
    ap.add_argument("--seq", type=int, nargs="+", help="tokens per pack for --gpu (default 8192 32768)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.gpu or args.device_memory_cpu:
        import torch

        if args.gpu and not torch.cuda.is_available():
            raise SystemExit("--gpu needs CUDA (--device-memory-cpu runs the same code on the CPU)")
        if args.gpu:
            rows = device_memory("internvl2-2b", args.seq or [8192, 32768], "bf16")
            name = torch.cuda.get_device_name()
        else:
            rows = device_memory("tiny", args.seq or [256, 512], "fp32")
            name = "CPU"
        print_device_memory(rows, f"one forward + backward on {name} (bare model, no optimizer / DDP buffers)")
        print(f"# {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        return
    if not args.skip_measure:
        measure()
    tables()
    print(f"# {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
