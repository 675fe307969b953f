"""Training-step throughput (tokens/s, TFLOP/s) on synthetic packed batches, and on the CPU our step
against transformers' ``InternVLForConditionalGeneration`` on the same model, weights and packs.

Our step is the training loop's own: ``build_model`` + megatron DDP + megatron's optimizer (Adam
with decoupled weight decay) + ``train_step`` over ``vlm_forward_step``, the step's micro-batches
through the loop's ``StepMeter`` (FLOPs from ``v2pe_megatron.flops``). No data loader: the packs are
made here with the real packer (``data.packing``), so the benchmark runs where DALI does not.

The comparison (the default on the CPU; docs/benchmarks.md): transformers' model is built from the
config the converter exports and loads OUR initial weights through the converter's table; it runs
forward + backward + grad clipping + ``torch.optim.AdamW`` (megatron's parameter groups) on the same
packs, V2PE positions, and, with more than one sub-sample per pack, a block-causal mask (the
attention ours computes). The two sides are two processes that step in turn (ours, transformers,
ours, ...; one warm-up pair left out, then ``--pairs`` pairs); the step-1 losses must agree within
``LOSS_RTOL`` or the run fails (exit 1) before anything is timed. Printed per comparison: each pair's
times and CPU seconds, the losses, each side's peak RSS over its steps, the load average before and
after and the CPU other processes used, and the median ratio with min and max on a ``result:``
line, or an ``under load (...), not a result:`` line when the machine was busy.

    .venv/bin/python benchmarks/step.py --subsamples 1 4 --pairs 5 --profile   # CPU: 4 x 512 LLM, 4K tokens, 8 tiles
    .venv/bin/python benchmarks/step.py --gpu                 # InternVL2-2B, local spec, bf16, 8K and 16K, MFU
    .venv/bin/python benchmarks/step.py --no-hf --preset tiny --seq-length 1024 --tiles 4 parallel.cp=2 --nproc 2
    .venv/bin/python benchmarks/step.py --preset tiny --seq-length 256 512 --plan-gib 78   # --gpu's code, CPU

Overrides (``key=value``) are recipe overrides on top of the chosen shapes. ``--profile``: one more
step per side under ``torch.profiler``, and a table of where the time goes (``_step_profile.py``).

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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _memory, _step_profile (also in the spawned sides)

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
    """transformers' InternVL with the recipe's shapes (Qwen2 or Llama LLM): the config the converter
    exports for the transformers-native layout (``convert.hf_config.hf_config_from_model``)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from v2pe_megatron.convert.errors import HFCheckpointError
    from v2pe_megatron.convert.hf_config import hf_config_from_model

    try:
        cfg = hf_config_from_model(model_cfg, "native")
    except HFCheckpointError as e:
        raise SystemExit(f"transformers' InternVL cannot take this model: {e}") from None
    torch.manual_seed(0)
    return InternVLForConditionalGeneration(InternVLConfig.from_dict(cfg)).train()


def hf_state(model, model_cfg) -> dict[str, torch.Tensor]:
    """Our model's weights under transformers' native names, through the converter's table
    (``convert.mappings``): the same mapping ``v2pe-convert export-hf`` and ``hf.load`` use."""
    from v2pe_megatron.convert.mappings import megatron_to_hf, weight_map
    from v2pe_megatron.model.checkpoint_names import checkpoint_name

    state = {checkpoint_name(k): p.detach() for k, p in model.named_parameters()}
    table = weight_map(model_cfg, "native")
    unmapped = sorted(set(state) - {mp.mcore for mp in table})
    if unmapped:
        raise RuntimeError(f"our parameter {unmapped[0]} has no transformers tensor in the converter's table")
    return megatron_to_hf(table, state)


def load_hf_weights(model, path: str, perturb: str | None = None) -> None:
    """Copy the tensors of ``path`` (safetensors, transformers' names) into ``model``, one at a time;
    every parameter must be covered and every tensor used. ``perturb``: the name of one tensor to
    scale by 1.05 (the benchmark's own test: the equal-loss check must catch it)."""
    from safetensors import safe_open

    own = dict(model.named_parameters())
    with safe_open(path, "pt") as f, torch.no_grad():
        names = set(f.keys())
        if names != set(own):
            raise RuntimeError(f"weights and transformers' model differ: missing {sorted(set(own) - names)[:3]}, "
                               f"unused {sorted(names - set(own))[:3]}")
        for k in names:
            own[k].copy_(f.get_tensor(k))
            if k == perturb:
                own[k].mul_(1.05)
    if perturb is not None and perturb not in names:
        raise KeyError(perturb)


def block_causal_mask(seq_lens, seq_length: int) -> torch.Tensor:
    """bool [rows, 1, S, S]: causal inside each sub-sample, nothing across (True = attend), the
    attention our packed step does, as a mask transformers' SDPA path takes as is."""
    rows = [seq_lens] if isinstance(seq_lens, torch.Tensor) and seq_lens.dim() == 1 else seq_lens
    out = torch.zeros(len(rows), 1, seq_length, seq_length, dtype=torch.bool)
    for i, lens in enumerate(rows):
        a = 0
        for n in (lens.tolist() if hasattr(lens, "tolist") else lens):
            out[i, 0, a:a + n, a:a + n] = torch.ones(n, n, dtype=torch.bool).tril()
            a += n
    return out


def hf_optimizer(model, o):
    """``torch.optim.AdamW`` with megatron's parameter groups: no weight decay on biases and 1-D
    parameters (norms, layer scales), as ``get_megatron_optimizer`` sets them for our side."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith(".bias") or p.dim() == 1 else decay).append(p)
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=o.lr,
                             betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay)


LOSS_RTOL = 1e-5   # step-1 losses of the two sides: |ours - theirs| <= LOSS_RTOL * |theirs| (fp32; seen: ~1e-7)
OTHERS_MAX = 0.25  # CPU other processes may use during the measured steps, as a share of the cores


class LossMismatch(RuntimeError):
    """The two sides' step-1 losses differ: they do not start from the same weights or do not compute
    the same function, so their times cannot be compared."""


def check_losses(ours: float, theirs: float, rtol: float = LOSS_RTOL) -> None:
    if not abs(ours - theirs) <= rtol * abs(theirs):
        raise LossMismatch(f"step-1 losses differ: ours {ours:.6f}, transformers {theirs:.6f} "
                           f"(|diff| {abs(ours - theirs):.2e} > {rtol:g} x {abs(theirs):.4f}): the two sides do not "
                           "compute the same step; no ratio")


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (``/proc/stat``: all but idle and iowait)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_verdict(load_before: float, load_after: float, others_cores: float, cores: int, threads: int,
                 ran_before: bool = False) -> str | None:
    """None when the machine was quiet enough for a result, else why not. The 1-minute load
    average after the run includes the benchmark's own ``threads``, and so does the one before
    when this process ran a comparison just before (``ran_before``); ``others_cores``: CPU other
    processes used during the measured steps, in cores."""
    why = []
    own = threads if ran_before else 0
    if load_before - own > cores:
        why.append(f"load average {load_before:.2f} before{f', less our {own} threads,' if own else ''} > {cores} cores")
    if load_after - threads > cores:
        why.append(f"load average {load_after:.2f} after, less our {threads} threads, > {cores} cores")
    if others_cores > OTHERS_MAX * cores:
        why.append(f"other processes used {others_cores:.2f} cores during the steps (> {OTHERS_MAX:g} x {cores})")
    return "; ".join(why) or None


def _serve(conn, ready: dict, step, prof) -> None:
    """One side's end of the interleaving: build done, report ``ready``; then answer ``("step", i)``
    with one timed step, ``("profile", i)`` with one profiled step, ``("done",)`` by returning.
    The resident peak restarts here, after the build: each side's is its steps' own."""
    import _memory as mem

    mem.release_memory()
    mem.reset_peak()
    conn.send({**ready, "rss_mib": mem.status_kib("VmRSS") / 1024, "pid": os.getpid()})
    while True:
        msg = conn.recv()
        if msg[0] == "step":
            dt, loss, extra = step(msg[1])
            conn.send({"dt": dt, "loss": loss, "peak_mib": mem.status_kib("VmHWM") / 1024, "cpu_s": own_cpu_s(),
                       **extra})
        elif msg[0] == "profile":
            conn.send(prof(msg[1]))
        else:
            conn.send(None)
            return


def ours_server(conn, overrides: list[str], subsamples: int, tiles: int, weights: str) -> None:
    """Our side (a 1-rank gloo group, ``run_distributed``): the training loop's step, ``train_step``
    over ``vlm_forward_step`` with megatron DDP and optimizer. Writes its initial weights to
    ``weights`` (transformers' names) before the first step."""
    import warnings

    warnings.filterwarnings("ignore")
    from safetensors.torch import save_file

    from megatron.core import parallel_state as ps

    import _step_profile as sp
    from v2pe_megatron.config import load_recipe, validate
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import resolve_spec
    from v2pe_megatron.runtime import distributed as rt
    from v2pe_megatron.training import engine, forward
    from v2pe_megatron.training.checkpointing import unwrap
    from v2pe_megatron.training.engine import build_optimizer, train_step, wrap_ddp
    from v2pe_megatron.training.forward import vlm_forward_step
    from v2pe_megatron.training.metrics import StepMeter

    recipe = load_recipe(None, overrides)
    layout = validate(recipe, world_size=1, spec=resolve_spec(recipe.model.spec, recipe.model.dtype))
    d, t = recipe.data, recipe.train
    with rt.model_parallel(layout.tp, layout.pp, layout.cp, seed=t.seed):
        model = build_model(recipe.model, layout, recompute=t.recompute)
        save_file(hf_state(model, recipe.model), weights)
        ddp = wrap_ddp(model, model.config, use_distributed_optimizer=layout.distributed_optimizer)
        opt = build_optimizer(recipe.optimizer, [ddp], params_dtype=model.config.params_dtype,
                              use_distributed_optimizer=layout.distributed_optimizer)
        meter = StepMeter(recipe, world_size=1, total_steps=10 ** 6, device=rt.device(),
                          dp_group=ps.get_data_parallel_group(with_context_parallel=False))
        tokens = d.micro_batch_size * d.seq_length

        def batch(i):
            return make_batch(recipe.model, rows=d.micro_batch_size, seq_length=d.seq_length, subsamples=subsamples,
                              tiles=tiles, pad_multiple=layout.seq_multiple, seed=1000 * i)

        def run(b):
            return train_step([ddp], opt, vlm_forward_step, meter.batches(iter([b]), 1), num_microbatches=1,
                              layout=layout, seq_length=d.seq_length, micro_batch_size=d.micro_batch_size)

        def step(i):
            b = batch(i)
            c0, t0 = time.process_time(), time.perf_counter()
            res = run(b)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            perf = meter.end_step(i + 1, dt, tokens)
            return dt, res.loss, {"flops": perf["step_flops"], "cpu_dt": cpu}

        def prof(i):
            b = batch(i)
            lm = unwrap(ddp).language_model
            scopes = [(opt, "step", "optimizer"), (opt, "zero_grad", "optimizer"),
                      (ddp, "zero_grad_buffer", "DDP grad buffers (zero, sync)"),
                      (engine, "_finalize_model_grads", "DDP grad buffers (zero, sync)"),
                      (forward, "prepare_batch", "data movement"),
                      (lm, "compute_language_model_loss", "loss")]
            res, cats, top, wall = sp.profiled(lambda: run(b), ddp, scopes)
            return {"loss": res.loss, "categories": cats, "top": top, "wall": wall}

        _serve(conn, {"params": sum(p.numel() for p in model.parameters()), "tokens": tokens,
                      "layout": layout.describe()}, step, prof)


def hf_server(conn, overrides: list[str], subsamples: int, tiles: int, weights: str, threads: int,
              perturb: str | None = None) -> None:
    """transformers' side (its own process): ``InternVLForConditionalGeneration`` with our initial
    weights, forward (loss from ``labels``) + backward + grad clipping + AdamW on the same packs.
    With more than one sub-sample per pack it gets a block-causal 4D mask, so that it computes what
    our packed attention computes (its SDPA still spends the whole row's attention on it)."""
    torch.set_num_threads(threads)
    import _step_profile as sp
    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.parallel.layout import seq_multiple

    recipe = load_recipe(None, overrides)
    d, o = recipe.data, recipe.optimizer
    model = hf_model(recipe.model)
    load_hf_weights(model, weights, perturb)
    opt = hf_optimizer(model, o)

    def inputs(i):
        b = make_batch(recipe.model, rows=d.micro_batch_size, seq_length=d.seq_length, subsamples=subsamples,
                       tiles=tiles, pad_multiple=seq_multiple(recipe.parallel.cp), seed=1000 * i)
        # transformers shifts labels itself: the trained positions of ``tokens``, one to the right.
        labels = torch.full_like(b.tokens, -100)
        labels[:, 1:] = torch.where(b.loss_mask[:, :-1] > 0, b.tokens[:, 1:], -100)
        mask = torch.ones_like(b.tokens) if subsamples == 1 else block_causal_mask(b.seq_lens, d.seq_length)
        return dict(input_ids=b.tokens, pixel_values=b.pixel_values, attention_mask=mask,
                    position_ids=b.position_ids.float(), labels=labels)

    def run(x):
        out = model(**x)
        out.loss.backward()
        with sp.record_function(sp.PREFIX + "optimizer"):
            if o.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return out.loss.item()

    def step(i):
        x = inputs(i)
        c0, t0 = time.process_time(), time.perf_counter()
        loss = run(x)
        return time.perf_counter() - t0, loss, {"cpu_dt": time.process_time() - c0}

    def prof(i):
        x = inputs(i)
        loss, cats, top, wall = sp.profiled(lambda: run(x), model, [(model, "loss_function", "loss")])
        return {"loss": loss, "categories": cats, "top": top, "wall": wall}

    _serve(conn, {"params": sum(p.numel() for p in model.parameters())}, step, prof)


def _recv(conn, alive, what: str, timeout: float = 3600.0):
    """The next message of one side; its death (or the timeout) is an error that says which side."""
    deadline = time.monotonic() + timeout
    while not conn.poll(1.0):
        if not alive():
            raise RuntimeError(f"{what} ended without answering")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer within {timeout:.0f} s")
    return conn.recv()


def interleave(ours, theirs, pairs: int, warmup: int = 1, log=None) -> dict:
    """Warm-up then ``pairs`` measured steps per side, alternating: ours, theirs, ours, theirs, ...
    ``ours``/``theirs``: ``ask(msg) -> reply`` of each side. The warm-up steps are not timed; the
    first one's losses (the step-1 losses: same weights, same pack, no update yet) must agree
    (:func:`check_losses`) before anything is measured. ``log`` receives ``(side, step)`` as the
    steps are asked for."""
    log = log if log is not None else []
    out = {"ours": [], "theirs": [], "busy0": None}
    for i in range(warmup + pairs):
        if i == warmup:
            out["busy0"] = cpu_busy_s()
            out["t0"] = time.monotonic()
        for side, ask in (("ours", ours), ("theirs", theirs)):
            log.append((side, i))
            out[side].append(ask(("step", i)))
        if i == 0:
            check_losses(out["ours"][0]["loss"], out["theirs"][0]["loss"])
    out["busy1"] = cpu_busy_s()
    out["t1"] = time.monotonic()
    out["warmup"] = warmup
    return out


def compare(overrides: list[str], *, pairs: int, subsamples: int, tiles: int, threads: int, profile: bool = False,
            perturb: str | None = None, warmup: int = 1) -> dict:
    """Both sides as two processes that step in turn (only one computes at a time), from the same
    weights: ours is built first and writes its weights; transformers' loads them."""
    import tempfile
    import threading

    import torch.multiprocessing as mp

    from v2pe_megatron.testing.distributed import run_distributed

    ctx = mp.get_context("spawn")
    o_here, o_there = ctx.Pipe()
    t_here, t_there = ctx.Pipe()
    done: dict = {}
    with tempfile.TemporaryDirectory(prefix="v2pe-step-") as tmp:
        weights = os.path.join(tmp, "weights.safetensors")

        def run_ours():
            try:
                done["ours"] = run_distributed(ours_server, 1, o_there, overrides, subsamples, tiles, weights,
                                               timeout=7200, threads_per_rank=threads)
            except BaseException as e:  # noqa: BLE001 - reported by _recv's caller
                done["error"] = e

        th = threading.Thread(target=run_ours, daemon=True)
        th.start()
        hf_proc = None
        try:
            ready_o = _recv(o_here, th.is_alive, "our side")
            hf_proc = ctx.Process(target=hf_server, args=(t_there, overrides, subsamples, tiles, weights, threads,
                                                          perturb), daemon=True)
            hf_proc.start()
            ready_t = _recv(t_here, hf_proc.is_alive, "transformers' side")

            def ours(msg):
                o_here.send(msg)
                return _recv(o_here, th.is_alive, "our side")

            def theirs(msg):
                t_here.send(msg)
                return _recv(t_here, hf_proc.is_alive, "transformers' side")

            res = interleave(ours, theirs, pairs, warmup)
            res["ready"] = {"ours": ready_o, "theirs": ready_t}
            if profile:
                res["profile"] = {"ours": ours(("profile", warmup + pairs)),
                                  "theirs": theirs(("profile", warmup + pairs))}
        except RuntimeError as e:
            if not isinstance(e, LossMismatch) and not th.is_alive() and "error" in done:
                raise done["error"] from None  # our side's own traceback (run_distributed's)
            raise
        finally:
            for conn in (o_here, t_here):  # ends both sides' loops, on success or not
                try:
                    conn.send(("done",))
                except OSError:
                    pass
            if hf_proc is not None:
                hf_proc.join(timeout=30)
                if hf_proc.is_alive():
                    hf_proc.kill()
            th.join(timeout=60)
    if "error" in done and not isinstance(done["error"], LossMismatch):
        raise done["error"]
    return res


def summarize(res: dict, *, cores: int, threads: int, load_before: float, load_after: float,
              ran_before: bool = False) -> dict:
    """Per-pair ratios (ours' tokens/s over transformers', i.e. their step time over ours), their
    median and spread, peaks, and whether the machine was quiet enough for a result."""
    w = res["warmup"]
    o, t = res["ours"][w:], res["theirs"][w:]
    ratios = [b["dt"] / a["dt"] for a, b in zip(o, t)]
    ours_cpu = (o[-1]["cpu_s"] - res["ours"][w - 1]["cpu_s"]) + (t[-1]["cpu_s"] - res["theirs"][w - 1]["cpu_s"])
    elapsed = res["t1"] - res["t0"]
    others = max(0.0, (res["busy1"] - res["busy0"]) - ours_cpu) / elapsed
    cpu = [b["cpu_dt"] / a["cpu_dt"] for a, b in zip(o, t) if a.get("cpu_dt") and b.get("cpu_dt")]
    return {"ratios": ratios, "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "cpu_median": statistics.median(cpu) if cpu else None,
            "t_ours": statistics.median(a["dt"] for a in o), "t_theirs": statistics.median(b["dt"] for b in t),
            "peak_ours": max(a["peak_mib"] for a in res["ours"]), "peak_theirs": max(b["peak_mib"] for b in res["theirs"]),
            "others_cores": others,
            "verdict": load_verdict(load_before, load_after, others, cores, threads, ran_before)}


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


def _loads() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_comparison(overrides: list[str], *, seq: int, tiles: int, subsamples: int, pairs: int, threads: int,
                   profile: bool = False, perturb: str | None = None, ran_before: bool = False) -> dict:
    """One comparison, printed: per-pair times and ratios, the step-1 losses, each side's resident
    peak, the load, and a ``result:`` line, or ``under load, not a result:`` when the machine was busy."""
    cores = os.cpu_count() or 1
    before = _loads()
    res = compare(overrides, pairs=pairs, subsamples=subsamples, tiles=tiles, threads=threads, profile=profile,
                  perturb=perturb)
    after = _loads()
    s = summarize(res, cores=cores, threads=threads, load_before=before, load_after=after, ran_before=ran_before)
    ro, rt_ = res["ready"]["ours"], res["ready"]["theirs"]
    w = res["warmup"]
    flops = statistics.median(a["flops"] for a in res["ours"][w:])
    what = f"{subsamples} sub-sample{'s' if subsamples > 1 else ''}"
    print(f"{seq} tokens, {tiles} tiles, {what} per pack; {ro['params'] / 1e6:.1f}M parameters on both sides "
          f"(transformers {rt_['params'] / 1e6:.1f}M); {ro['layout']}; {flops / 1e12:.4f} TFLOP (model) per step",
          flush=True)
    for i, (a, b, r) in enumerate(zip(res["ours"][w:], res["theirs"][w:], s["ratios"]), 1):
        print(f"  pair {i}: ours {a['dt']:.3f} s, transformers {b['dt']:.3f} s, ratio {r:.3f} "
              f"(CPU seconds of the step, all threads: {a['cpu_dt']:.2f} and {b['cpu_dt']:.2f})", flush=True)
    lo, lt = res["ours"][0]["loss"], res["theirs"][0]["loss"]
    print(f"step-1 loss: ours {lo:.6f}, transformers {lt:.6f} (|diff| {abs(lo - lt):.1e}, must be <= "
          f"{LOSS_RTOL:g} x loss); later steps: ours {' '.join(f'{a['loss']:.5f}' for a in res['ours'][1:])}; "
          f"transformers {' '.join(f'{b['loss']:.5f}' for b in res['theirs'][1:])}", flush=True)
    print(f"peak RSS during the steps (each process's VmHWM, restarted after its build): ours {s['peak_ours']:.0f} MiB "
          f"(after build {ro['rss_mib']:.0f}), transformers {s['peak_theirs']:.0f} MiB (after build "
          f"{rt_['rss_mib']:.0f})", flush=True)
    print(f"load average {before:.2f} before, {after:.2f} after ({cores} cores, {threads} threads per side); "
          f"other processes used {s['others_cores']:.2f} cores during the measured steps", flush=True)
    tag = "result" if s["verdict"] is None else f"under load ({s['verdict']}), not a result"
    print(f"{tag}: {what}: ours / transformers (tokens/s) {s['median']:.3f}x median of {len(s['ratios'])} interleaved "
          f"pairs (min {s['min']:.3f}, max {s['max']:.3f}); {ro['tokens'] / s['t_ours']:.0f} vs "
          f"{ro['tokens'] / s['t_theirs']:.0f} tokens/s; peak RSS ours/transformers "
          f"{s['peak_ours'] / s['peak_theirs']:.3f}; CPU-time ratio {s['cpu_median']:.3f} (median); "
          f"load {before:.2f}/{after:.2f}", flush=True)
    if profile:
        import _step_profile as sp

        po, pt = res["profile"]["ours"], res["profile"]["theirs"]
        print(f"profile of one more step ({what}; seconds of operator self time per part):", flush=True)
        print(sp.table(po["categories"], pt["categories"], po["wall"], pt["wall"]), flush=True)
        for side, p in (("ours", po), ("transformers", pt)):
            print(f"top operators per part, {side}:", flush=True)
            for cat in sp.ORDER:
                if p["top"].get(cat):
                    print(f"  {cat}: " + ", ".join(f"{n} {t:.3f}" for n, t in p["top"][cat]), flush=True)
    return {"summary": s, "result": res}


def main(argv: list[str] | None = None) -> int:
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
    ap.add_argument("--subsamples", type=int, nargs="+", default=[1],
                    help="sub-samples per pack; several values: one comparison each (default 1)")
    ap.add_argument("--pairs", type=int, default=5,
                    help="interleaved measured step pairs (ours, transformers) per comparison, after one warm-up pair")
    ap.add_argument("--profile", action="store_true",
                    help="after the pairs, one more step per side under torch.profiler: where the time goes")
    ap.add_argument("--steps", type=int, default=3, help="--no-hf and --gpu: measured steps (after one warm-up step)")
    ap.add_argument("--nproc", type=int, default=1, help="--no-hf: ranks for our step (gloo on the CPU)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="CPU threads per side (both sides alike; only one side computes at a time)")
    ap.add_argument("--no-hf", action="store_true", help="our step alone")
    args = ap.parse_args(argv)

    base = (GPU_2B if args.gpu else MID) if not args.preset else [f"model.preset={args.preset}"]
    lengths = args.seq_length or (list(GPU_LENGTHS) if args.gpu else [4096])
    plan_gib = args.plan_gib if args.plan_gib is not None else (GPU_MEM_GIB if args.gpu else None)
    with_hf = not args.gpu and not args.no_hf and plan_gib is None
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    if plan_gib is not None and args.nproc != 1:
        raise SystemExit("--plan-gib plans one GPU: run it with --nproc 1")
    if plan_gib is not None and not (args.gpu or args.preset):
        raise SystemExit("--plan-gib needs --gpu or --preset: v2pe-plan plans a preset's shapes")
    if with_hf and args.nproc != 1:
        ap.error("--nproc: the comparison with transformers runs one rank per side; use --no-hf for more ranks")
    if with_hf and args.pairs < 3:
        ap.error(f"--pairs {args.pairs}: a ratio needs at least 3 interleaved pairs (median and spread)")
    if args.profile and not with_hf:
        ap.error("--profile profiles the comparison with transformers: drop --no-hf/--gpu/--plan-gib")
    git = os.popen(f"git -C {Path(__file__).resolve().parents[1]} rev-parse --short HEAD 2>/dev/null").read().strip()
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}  commit {git or '?'}  torch {torch.__version__}  "
          f"threads {args.threads}  cores {os.cpu_count()}  load average {_loads():.2f}  {' '.join(args.overrides)}",
          flush=True)
    if plan_gib is not None:
        runs = planned_runs(base, lengths, args.tiles, plan_gib, args.overrides)
    else:
        runs = [{"seq": seq, "overrides": run_overrides(base, seq, args.overrides)} for seq in lengths]
    if with_hf:
        import transformers

        print(f"# transformers {transformers.__version__}; interleaved: ours, transformers, ours, ... "
              f"(1 warm-up pair, then {args.pairs} measured pairs)", flush=True)
        ran = False
        for run in runs:
            for n in args.subsamples:
                try:
                    run_comparison(run["overrides"], seq=run["seq"], tiles=args.tiles, subsamples=n,
                                   pairs=args.pairs, threads=args.threads, profile=args.profile, ran_before=ran)
                    ran = True
                except LossMismatch as e:
                    print(f"error: {e}", file=sys.stderr, flush=True)
                    return 1
        return 0
    mfu = None
    results = []
    for run in runs:
        seq, overrides = run["seq"], run["overrides"]
        if args.gpu or plan_gib is not None:  # one rank, in this process
            ours = measure_ours(overrides, args.steps, args.subsamples[0], args.tiles)
        else:
            from v2pe_megatron.testing.distributed import run_distributed

            ours = run_distributed(measure_ours, args.nproc, overrides, args.steps, args.subsamples[0], args.tiles,
                                   timeout=3600, threads_per_rank=max(1, args.threads // args.nproc))[0]
        flops = statistics.median(ours["flops"])
        print(f"{seq} tokens, {args.tiles} tiles, {args.subsamples[0]} sub-sample(s) per pack; "
              f"{ours['params'] / 1e6:.1f}M parameters per rank; {ours['layout']}; recompute {ours['recompute']}; "
              f"{ours['device']}; {flops / 1e12:.4f} TFLOP (model) per step, "
              f"{statistics.median(ours['hw_flops']) / 1e12:.4f} with recompute", flush=True)
        print(_line("v2pe-megatron", ours["tokens"], ours["times"], flops, ours["world"], ours["peak"]), flush=True)
        if ours["peak"]:
            mfu = 100 * flops / ours["world"] / statistics.median(ours["times"]) / ours["peak"]
        if plan_gib is not None:
            results.append(_result_line(seq, args.tiles, run, ours, plan_gib))
        elif mfu is not None:
            print(f"MFU at {seq}: {mfu:.1f}%", flush=True)
    for line in results:
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
