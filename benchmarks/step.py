"""Training-step throughput (tokens/s, TFLOP/s) on synthetic packed batches, and on the CPU the same
model, tokens and tiles in transformers' ``InternVLForConditionalGeneration`` side by side.

Our step is the training loop's own: ``build_model`` + megatron DDP + megatron's optimizer (Adam
with decoupled weight decay) + ``train_step`` over ``vlm_forward_step``, the step's micro-batches
through the loop's ``StepMeter`` (FLOPs from ``v2pe_megatron.flops``). No data loader: the packs are
made here with the real packer (``data.packing``), so the benchmark runs where DALI does not.
transformers runs forward + backward + ``torch.optim.AdamW`` on one row of the same tokens, pixels
and V2PE positions (an all-ones attention mask: causal over the row). With one sub-sample per row
(``--subsamples 1``, the default) both do the same attention work; with more, ours attends within
sub-samples only while transformers' eager/SDPA path attends over the whole row.

    .venv/bin/python benchmarks/step.py                       # CPU mid-size: 4 x 512 LLM, 4K tokens, 8 tiles
    .venv/bin/python benchmarks/step.py --gpu                 # InternVL2-2B, local spec, bf16, 8K and 16K, MFU
    .venv/bin/python benchmarks/step.py --preset tiny --seq-length 1024 --tiles 4 parallel.cp=2 --nproc 2
    .venv/bin/python benchmarks/step.py --preset tiny --seq-length 256 512 --plan-gib 78 --no-hf  # --gpu's code, CPU

Overrides (``key=value``) are recipe overrides on top of the chosen shapes. Every measured step is
timed after a warm-up step, which is left out. The last line is the ratio ours / transformers
(tokens/s) on the CPU, or the MFU on the GPU.

``--gpu`` (and ``--plan-gib G`` with ``--preset``) runs one rank with, per length, the recompute
setting ``v2pe-plan`` picks for one GPU of G GiB (``GPU_MEM_GIB``, the lent H100's 78 GiB, with
``--gpu``), and prints a ``result:`` line per length: step time, tokens/s, TFLOP/s, MFU, and
``torch.cuda.max_memory_allocated`` over the run (model build, warm-up and measured steps) next to
the plan's per-GPU memory less its runtime reserve (CUDA context, NCCL, cuBLAS: not in torch's
allocator). ``tests/test_benchmark_step.py`` asserts that every ``--gpu`` run fits the planner at 78 GiB
(a 32K pack without recompute needs ~155 GiB). ``tools/device_check.sh`` part 6 runs ``--gpu``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The CPU comparison: a mid-size InternVL (4 x 512 LLM with GQA, a 4 x 256 ViT on 224 px tiles).
MID = ["model.preset=tiny", "model.spec=local",
       "model.vision.num_layers=4", "model.vision.hidden_size=256", "model.vision.num_attention_heads=4",
       "model.vision.ffn_hidden_size=1024", "model.vision.image_size=224", "model.vision.patch_size=14",
       "model.language.arch=qwen2", "model.language.qkv_bias=true", "model.language.num_layers=4",
       "model.language.hidden_size=512", "model.language.num_attention_heads=8",
       "model.language.num_query_groups=4", "model.language.ffn_hidden_size=1536",
       "model.language.vocab_size=16384", "model.language.max_position_embeddings=65536",
       "model.img_start_token_id=16381", "model.img_end_token_id=16382", "model.img_context_token_id=16383"]
GPU_2B = ["model.preset=internvl2-2b", "model.spec=local", "model.dtype=bf16"]
COMMON = ["optimizer.clip_grad=1.0", "optimizer.lr=1e-5", "train.recompute=none"]
GPU_LENGTHS = (8192, 16384)   # --gpu: tokens per pack
GPU_MEM_GIB = 78.0            # --gpu: the memory of the GPU the plan is made for (the lent H100)
TILES = 8                     # tiles per pack (--tiles)


def run_overrides(base: list[str], seq: int, extra: list[str] = ()) -> list[str]:
    """One length's recipe overrides: the shapes, ``COMMON``, one pack of ``seq`` tokens per step."""
    return base + COMMON + [f"data.seq_length={seq}", "data.micro_batch_size=1", "data.global_batch_size=1"] + list(extra)


def planned_memory(recipe, tiles: int, gpu_mem_gib: float):
    """(memory breakdown, usable bytes) that ``v2pe-plan`` gives this one-rank run on one GPU of
    ``gpu_mem_gib`` GiB: the recipe's own recompute, lengths, dtype, loss chunking and spec."""
    from v2pe_megatron.parallel.layout import Layout, resolve_spec
    from v2pe_megatron.plan import GIB, Cluster, memory_breakdown

    cluster = Cluster(gpus=1, gpu_mem_gib=gpu_mem_gib)
    m, d = recipe.model, recipe.data
    spec = resolve_spec(m.spec)
    layout = Layout(spec=spec, distributed_optimizer=recipe.parallel.use_distributed_optimizer)
    mem = memory_breakdown(m, layout, seq_length=d.seq_length, micro_batch_size=d.micro_batch_size,
                           tiles=tiles * d.micro_batch_size, microbatches=d.global_batch_size // d.micro_batch_size,
                           recompute=recipe.train.recompute, dtype=m.dtype, path=spec,
                           loss_chunk_tokens=m.loss_chunk_tokens, runtime_reserved_gib=cluster.runtime_reserved_gib)
    return mem, cluster.usable_gib * GIB, cluster.runtime_reserved_gib * GIB


def planned_runs(base: list[str], lengths, tiles: int, gpu_mem_gib: float, extra: list[str] = ()) -> list[dict]:
    """Per length: the overrides with ``train.recompute`` set to what ``v2pe-plan`` recommends for one
    GPU of ``gpu_mem_gib`` GiB (``extra`` still wins), and the plan's memory for the run as set."""
    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.parallel.layout import resolve_spec
    from v2pe_megatron.plan import model_config, plan

    runs = []
    for seq in lengths:
        recipe = load_recipe(None, run_overrides(base, seq, extra))
        m = recipe.model
        preset = model_config(m.preset) if m.preset else None
        if preset is None or (m.vision, m.language, m.projector) != (preset.vision, preset.language, preset.projector):
            raise SystemExit("--plan-gib needs a preset's own shapes (--gpu, or --preset without model overrides): "
                             "v2pe-plan plans presets")
        p = plan(m.preset, seq, 1, gpu_mem_gib, global_batch_size=recipe.data.global_batch_size,
                 image_share=tiles * m.num_image_token / seq, dtype=m.dtype, loss_chunk_tokens=m.loss_chunk_tokens,
                 path=resolve_spec(m.spec))
        if p.recommended is None:
            raise SystemExit(f"v2pe-plan: {seq} tokens do not fit one {gpu_mem_gib:g} GiB GPU: " + "; ".join(p.advice))
        overrides = run_overrides(base, seq, [f"train.recompute={p.recommended.recompute}", *extra])
        recipe = load_recipe(None, overrides)
        mem, usable, reserved = planned_memory(recipe, tiles, gpu_mem_gib)
        runs.append({"seq": seq, "overrides": overrides, "recompute": recipe.train.recompute,
                     "planned_peak": mem.total - reserved, "planned_total": mem.total, "usable": usable})
    return runs


def make_batch(model_cfg, *, rows: int, seq_length: int, subsamples: int, tiles: int, pad_multiple: int,
               seed: int):
    """A collated micro-batch of ``rows`` packs, each exactly ``seq_length`` tokens in ``subsamples``
    sub-samples (no padding tail), ``tiles`` tiles per row spread over them (one image each), V2PE
    delta 1/4 for the images, ~70% of the tokens trained."""
    from v2pe_megatron.data.packing import PreparedSample, build_pack, collate
    from v2pe_megatron.v2pe import compute_position_ids

    rng = np.random.default_rng(seed)
    v, tpt = model_cfg.vision, model_cfg.num_image_token
    s_id, e_id, c_id = model_cfg.img_start_token_id, model_cfg.img_end_token_id, model_cfg.img_context_token_id
    # text: any id from 10 up but the image tokens (at the top of InternVL's vocabularies, low in the tiny one)
    text_ids = np.setdiff1d(np.arange(10, model_cfg.language.vocab_size), [s_id, e_id, c_id])
    unit = seq_length // pad_multiple
    if unit < subsamples:
        raise ValueError(f"{subsamples} sub-samples do not fit {seq_length} tokens at multiples of {pad_multiple}")
    packs = []
    for _ in range(rows):
        lens = [unit // subsamples * pad_multiple] * subsamples
        lens[-1] += seq_length - sum(lens)
        per = [tiles // subsamples + (1 if i < tiles % subsamples else 0) for i in range(subsamples)]
        samples = []
        for n, t in zip(lens, per):
            img = [s_id] + [c_id] * (tpt * t) + [e_id] if t else []
            if len(img) + 2 > n:
                raise ValueError(f"{t} tiles ({tpt * t} tokens) do not fit a sub-sample of {n} tokens")
            text = text_ids[rng.integers(0, len(text_ids), n - len(img))]
            at = int(rng.integers(1, len(text)))
            toks = np.concatenate([text[:at], np.asarray(img, np.int64), text[at:]]).astype(np.int64)
            pos = compute_position_ids(toks, img_start_id=s_id, img_end_id=e_id, img_context_id=c_id,
                                       delta=[0.25] if t else 1.0)
            pixels = rng.standard_normal((t, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
            samples.append(PreparedSample(len(samples), toks, rng.random(n) > 0.3, pos, pixels,
                                          np.asarray([t] if t else [], np.int32),
                                          np.asarray([0.25] if t else [], np.float64)))
        packs.append(build_pack(samples, seq_length, pad_id=0, pad_multiple=pad_multiple,
                                image_shape=(v.num_channels, v.image_size, v.image_size)))
    return collate(packs)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_ours(overrides: list[str], steps: int, subsamples: int, tiles: int) -> dict:
    """On every rank of the current process group (or a 1-rank group it makes): warm-up + ``steps``
    training steps; returns per-step seconds and FLOPs (rank 0's view; FLOPs are global)."""
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state as ps

    from v2pe_megatron.config import load_recipe, validate
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import resolve_spec
    from v2pe_megatron.runtime import distributed as rt
    from v2pe_megatron.training.engine import build_optimizer, train_step, wrap_ddp
    from v2pe_megatron.training.forward import vlm_forward_step
    from v2pe_megatron.training.metrics import StepMeter

    recipe = load_recipe(None, overrides)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    layout = validate(recipe, world_size=world, spec=resolve_spec(recipe.model.spec, recipe.model.dtype))
    d, t = recipe.data, recipe.train
    cuda = torch.cuda.is_available()
    if cuda:  # the peak of this run alone: from before the model exists (a previous length's is freed)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else None
    with rt.model_parallel(layout.tp, layout.pp, layout.cp, seed=t.seed):
        model = build_model(recipe.model, layout, recompute=t.recompute)
        ddp = wrap_ddp(model, model.config, use_distributed_optimizer=layout.distributed_optimizer)
        opt = build_optimizer(recipe.optimizer, [ddp], params_dtype=model.config.params_dtype,
                              use_distributed_optimizer=layout.distributed_optimizer)
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        num_micro = d.global_batch_size // (d.micro_batch_size * dp)
        meter = StepMeter(recipe, world_size=torch.distributed.get_world_size(), total_steps=steps + 1,
                          device=rt.device(), dp_group=ps.get_data_parallel_group(with_context_parallel=False))
        times, step_flops, hw, losses = [], [], [], []
        for step in range(steps + 1):
            mbs = [make_batch(recipe.model, rows=d.micro_batch_size, seq_length=d.seq_length, subsamples=subsamples,
                              tiles=tiles, pad_multiple=layout.seq_multiple, seed=1000 * step + 10 * dp_rank + i)
                   for i in range(num_micro)]
            torch.distributed.barrier()
            _sync()
            t0 = time.perf_counter()
            res = train_step([ddp], opt, vlm_forward_step, meter.batches(iter(mbs), num_micro),
                             num_microbatches=num_micro, layout=layout, seq_length=d.seq_length,
                             micro_batch_size=d.micro_batch_size)
            _sync()
            dt = time.perf_counter() - t0
            perf = meter.end_step(step + 1, dt, d.global_batch_size * d.seq_length)
            if step:  # the first step is the warm-up
                times.append(dt)
                step_flops.append(perf["step_flops"])
                hw.append(perf["hw_tflops_per_device"] * 1e12 * perf["step_time_s"] * world)
                losses.append(res.loss)
        name = torch.cuda.get_device_name() if cuda else "CPU"
        return {"times": times, "flops": step_flops, "hw_flops": hw, "losses": losses, "world": world,
                "peak": meter.peak, "device": name, "layout": layout.describe(),
                "tokens": d.global_batch_size * d.seq_length, "recompute": t.recompute,
                "params": sum(p.numel() for p in model.parameters()),
                "max_allocated": torch.cuda.max_memory_allocated() if cuda else None, "allocated_before": before}


def hf_model(model_cfg):
    """transformers' InternVL with the recipe's shapes (Qwen2 or Llama LLM)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    v, lm = model_cfg.vision, model_cfg.language
    if lm.arch not in ("qwen2", "llama"):
        raise SystemExit(f"transformers' InternVL takes a qwen2 or llama LLM, not {lm.arch}: "
                         "set model.language.arch")
    text = dict(model_type=lm.arch, hidden_size=lm.hidden_size, num_hidden_layers=lm.num_layers,
                num_attention_heads=lm.num_attention_heads, num_key_value_heads=lm.num_query_groups,
                intermediate_size=lm.ffn_hidden_size, vocab_size=lm.vocab_size, tie_word_embeddings=False,
                max_position_embeddings=lm.max_position_embeddings, rope_theta=lm.rotary_base,
                rms_norm_eps=lm.norm_eps)
    if lm.arch == "llama":
        text["attention_bias"] = lm.qkv_bias
    cfg = InternVLConfig(
        vision_config=dict(hidden_size=v.hidden_size, num_hidden_layers=v.num_layers,
                           num_attention_heads=v.num_attention_heads, intermediate_size=v.ffn_hidden_size,
                           image_size=v.image_size, patch_size=v.patch_size, attention_bias=v.qkv_bias,
                           layer_norm_eps=v.layernorm_eps, layer_scale_init_value=v.layer_scale_init),
        text_config=text, image_token_id=model_cfg.img_context_token_id,
        downsample_ratio=model_cfg.projector.downsample_ratio, tie_word_embeddings=False)
    torch.manual_seed(0)
    return InternVLForConditionalGeneration(cfg).train()


def measure_hf(overrides: list[str], steps: int, subsamples: int, tiles: int, threads: int) -> dict:
    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.parallel.layout import seq_multiple

    torch.set_num_threads(threads)
    recipe = load_recipe(None, overrides)
    d, o = recipe.data, recipe.optimizer
    model = hf_model(recipe.model)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                            weight_decay=o.weight_decay)
    times, losses = [], []
    rows = d.global_batch_size  # packs per step: one row each
    for step in range(steps + 1):
        b = make_batch(recipe.model, rows=rows, seq_length=d.seq_length, subsamples=subsamples, tiles=tiles,
                       pad_multiple=seq_multiple(recipe.parallel.cp), seed=1000 * step)
        # transformers shifts labels itself: the trained positions of ``tokens``, one to the right.
        labels = torch.full_like(b.tokens, -100)
        labels[:, 1:] = torch.where(b.loss_mask[:, :-1] > 0, b.tokens[:, 1:], -100)
        t0 = time.perf_counter()
        out = model(input_ids=b.tokens, pixel_values=b.pixel_values, attention_mask=torch.ones_like(b.tokens),
                    position_ids=b.position_ids.float(), labels=labels)
        out.loss.backward()
        if o.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if step:
            times.append(dt)
            losses.append(out.loss.item())
    return {"times": times, "losses": losses, "tokens": rows * d.seq_length,
            "params": sum(p.numel() for p in model.parameters())}


def _line(name: str, tokens: int, times: list[float], flops: float | None, world: int, peak=None) -> str:
    t = statistics.median(times)
    s = f"{name:<14} {t:8.3f} s/step (min {min(times):.3f})  {tokens / t:9.0f} tokens/s"
    if flops:
        s += f"  {flops / world / t / 1e12:8.4f} TFLOP/s per device"
        if peak:
            s += f"  MFU {100 * flops / world / t / peak:5.1f}%"
    return s


def _result_line(seq: int, tiles: int, run: dict, ours: dict, gpu_mem_gib: float) -> str:
    """The one line per length that tools/device_check.sh puts in its summary."""
    t = statistics.median(ours["times"])
    flops = statistics.median(ours["flops"]) / ours["world"] / t
    mfu = f"MFU {100 * flops / ours['peak']:.1f}%" if ours["peak"] else "MFU n/a (no peak for this device)"
    gib = 2 ** 30
    if ours["max_allocated"] is not None:
        mem = (f"max_memory_allocated {ours['max_allocated'] / gib:.2f} GiB, plan {run['planned_peak'] / gib:.2f} GiB "
               f"(plan/measured {run['planned_peak'] / ours['max_allocated']:.3f})")
        if ours["allocated_before"] > gib / 16:
            mem += f", {ours['allocated_before'] / gib:.2f} GiB already allocated before the build"
    else:
        mem = f"max_memory_allocated n/a on the CPU, plan {run['planned_peak'] / gib:.3f} GiB"
    return (f"result: {seq} tokens, {tiles} tiles, recompute {ours['recompute']} (v2pe-plan, one "
            f"{gpu_mem_gib:g} GiB GPU): {t:.3f} s/step, {ours['tokens'] / t:.0f} tokens/s, {flops / 1e12:.4g} TFLOP/s, "
            f"{mfu}; {mem}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. parallel.cp=2 model.language.num_layers=8")
    ap.add_argument("--gpu", action="store_true",
                    help="CUDA: InternVL2-2B shapes, local spec, bf16, 8K and 16K tokens, v2pe-plan's recompute for "
                         f"one {GPU_MEM_GIB:g} GiB GPU, MFU and max_memory_allocated against the plan")
    ap.add_argument("--preset", help="start from this preset's shapes instead of the mid-size CPU model")
    ap.add_argument("--seq-length", type=int, nargs="+",
                    help=f"tokens per pack (default 4096; --gpu: {' '.join(map(str, GPU_LENGTHS))})")
    ap.add_argument("--plan-gib", type=float, default=None,
                    help=f"recompute as v2pe-plan picks for one GPU of this many GiB, and the plan's memory next to "
                         f"the measured one (default with --gpu: {GPU_MEM_GIB:g})")
    ap.add_argument("--tiles", type=int, default=TILES, help="tiles per pack")
    ap.add_argument("--subsamples", type=int, default=1, help="sub-samples per pack")
    ap.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    ap.add_argument("--nproc", type=int, default=1, help="ranks for our step (gloo on the CPU)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all (split over ranks)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--hf-first", action="store_true", help="measure transformers before ours (order check)")
    args = ap.parse_args(argv)

    base = (GPU_2B if args.gpu else MID) if not args.preset else [f"model.preset={args.preset}"]
    lengths = args.seq_length or (list(GPU_LENGTHS) if args.gpu else [4096])
    plan_gib = args.plan_gib if args.plan_gib is not None else (GPU_MEM_GIB if args.gpu else None)
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    if plan_gib is not None and args.nproc != 1:
        raise SystemExit("--plan-gib plans one GPU: run it with --nproc 1")
    if plan_gib is not None and not (args.gpu or args.preset):
        raise SystemExit("--plan-gib needs --gpu or --preset: v2pe-plan plans a preset's shapes")
    git = os.popen(f"git -C {Path(__file__).resolve().parents[1]} rev-parse --short HEAD 2>/dev/null").read().strip()
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}  commit {git or '?'}  torch {torch.__version__}  "
          f"threads {args.threads}  load average {os.getloadavg()[0]:.1f}  {' '.join(args.overrides)}", flush=True)
    if plan_gib is not None:
        runs = planned_runs(base, lengths, args.tiles, plan_gib, args.overrides)
    else:
        runs = [{"seq": seq, "overrides": run_overrides(base, seq, args.overrides)} for seq in lengths]
    ratio = mfu = None
    results = []
    for run in runs:
        seq, overrides = run["seq"], run["overrides"]
        with_hf = not args.gpu and not args.no_hf
        hf = measure_hf(overrides, args.steps, args.subsamples, args.tiles, args.threads) if (
            with_hf and args.hf_first) else None
        if args.gpu or plan_gib is not None:  # one rank, in this process
            ours = measure_ours(overrides, args.steps, args.subsamples, args.tiles)
        else:
            from v2pe_megatron.testing.distributed import run_distributed

            ours = run_distributed(measure_ours, args.nproc, overrides, args.steps, args.subsamples, args.tiles,
                                   timeout=3600, threads_per_rank=max(1, args.threads // args.nproc))[0]
        flops = statistics.median(ours["flops"])
        print(f"{seq} tokens, {args.tiles} tiles, {args.subsamples} sub-sample(s) per pack; {ours['params'] / 1e6:.1f}M "
              f"parameters per rank; {ours['layout']}; recompute {ours['recompute']}; {ours['device']}; "
              f"{flops / 1e12:.4f} TFLOP (model) per step, "
              f"{statistics.median(ours['hw_flops']) / 1e12:.4f} with recompute", flush=True)
        print(_line("v2pe-megatron", ours["tokens"], ours["times"], flops, ours["world"], ours["peak"]), flush=True)
        if ours["peak"]:
            mfu = 100 * flops / ours["world"] / statistics.median(ours["times"]) / ours["peak"]
        if plan_gib is not None:
            results.append(_result_line(seq, args.tiles, run, ours, plan_gib))
        if with_hf:
            hf = hf or measure_hf(overrides, args.steps, args.subsamples, args.tiles, args.threads)
            print(_line("transformers", hf["tokens"], hf["times"], flops, 1), flush=True)
            ratio = (ours["tokens"] / statistics.median(ours["times"])) / (hf["tokens"] / statistics.median(hf["times"]))
            print(f"losses: ours {' '.join(f'{x:.4f}' for x in ours['losses'])}; transformers "
                  f"{' '.join(f'{x:.4f}' for x in hf['losses'])}", flush=True)
            print(f"# load average {os.getloadavg()[0]:.1f}", flush=True)
            print(f"ours / transformers (tokens/s) at {seq}: {ratio:.2f}x", flush=True)
        elif mfu is not None:
            print(f"MFU at {seq}: {mfu:.1f}%", flush=True)
    for line in results:
        print(line, flush=True)


if __name__ == "__main__":
    main()
