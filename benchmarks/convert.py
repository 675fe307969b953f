"""Seconds and peak RSS of ``v2pe-convert`` import and export, InternVL2-2B shapes, random weights.

Writes an InternVL2-2B-shaped remote-code checkpoint (InternViT-300M + InternLM2-1.8B, 2.2B
parameters) with random weights as sharded safetensors on the fly (one tensor in memory at a time),
then runs import-hf (single process, TP = PP = 1) and export-hf, each in a fresh subprocess whose
peak RSS is the kernel's high-water mark of its address space (``VmHWM``; not ``ru_maxrss``, which
a child inherits from the parent at the fork). Reports each peak as a ratio of the
largest shard and of the model size, and checks the export is bit-identical to the source.

    .venv/bin/python benchmarks/convert.py [--dtype bf16|fp32] [--shard-gb 1.0] [--workdir DIR] [--keep]

bf16 is the default: it is what InternVL2 checkpoints ship in, and fp32 (8.8 GB on disk per copy,
three copies) does not fit a small machine's disk and memory next to other jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _model_config(dtype: str):
    from v2pe_megatron.config import load_recipe

    mc = load_recipe(None, ["model.preset=internvl2-2b", "model.spec=local", f"model.dtype={dtype}"]).model
    return mc


def _hf_shapes(mc) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes, in file order, from the table and the analytic megatron shapes."""
    from v2pe_megatron.convert.mappings import hf_shapes, weight_map

    v, lm = mc.vision, mc.language
    c, f, h = v.hidden_size, v.ffn_hidden_size, lm.hidden_size
    d = h // lm.num_attention_heads
    qkv = (lm.num_attention_heads + 2 * lm.num_query_groups) * d
    inner = int(round(c / mc.projector.downsample_ratio ** 2))
    side = v.image_size // v.patch_size
    by_suffix = {
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.position_embedding": (1, side * side + 1, c),
        "vision_model.embeddings.patch_embedding.weight": (c, v.num_channels, v.patch_size, v.patch_size),
        "vision_model.embeddings.patch_embedding.bias": (c,),
        "projector.layer_norm.weight": (inner,), "projector.layer_norm.bias": (inner,),
        "projector.linear_1.weight": (h, inner), "projector.linear_1.bias": (h,),
        "projector.linear_2.weight": (h, h), "projector.linear_2.bias": (h,),
        "language_model.embedding.word_embeddings.weight": (lm.vocab_size, h),
        "language_model.output_layer.weight": (lm.vocab_size, h),
        "language_model.decoder.final_layernorm.weight": (h,),
    }
    vit = {"input_layernorm.weight": (c,), "input_layernorm.bias": (c,), "pre_mlp_layernorm.weight": (c,),
           "pre_mlp_layernorm.bias": (c,), "self_attention.linear_qkv.weight": (3 * c, c),
           "self_attention.linear_qkv.bias": (3 * c,), "self_attention.linear_proj.weight": (c, c),
           "self_attention.linear_proj.bias": (c,), "mlp.linear_fc1.weight": (f, c), "mlp.linear_fc1.bias": (f,),
           "mlp.linear_fc2.weight": (c, f), "mlp.linear_fc2.bias": (c,), "self_attn_bda.ls": (c,), "mlp_bda.ls": (c,)}
    llm = {"input_layernorm.weight": (h,), "pre_mlp_layernorm.weight": (h,),
           "self_attention.linear_qkv.weight": (qkv, h), "self_attention.linear_proj.weight": (h, h),
           "mlp.linear_fc1.weight": (2 * lm.ffn_hidden_size, h), "mlp.linear_fc2.weight": (h, lm.ffn_hidden_size)}
    out = []
    for mp in weight_map(mc, "remote"):
        name = mp.mcore
        if name in by_suffix:
            shape = by_suffix[name]
        else:
            tail = name.split(".", 4)[4]
            shape = (vit if name.startswith("vision_model.") else llm)[tail]
        out += list(zip(mp.hf, hf_shapes(mp, shape)))
    return out


def write_checkpoint(out: Path, dtype: str, shard_bytes: int) -> dict:
    import torch

    from v2pe_megatron.convert.hf_config import hf_config_from_model
    from v2pe_megatron.convert.safetensors_io import ShardWriter

    mc = _model_config(dtype)
    out.mkdir(parents=True)
    tdt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    g = torch.Generator().manual_seed(0)
    w = ShardWriter(out, shard_bytes)
    n = 0
    for name, shape in _hf_shapes(mc):
        w.add(name, (torch.randn(*shape, generator=g) * 0.02).to(tdt))
        n += 1
    shards = w.close()
    (out / "config.json").write_text(json.dumps(hf_config_from_model(mc, "remote")))
    (out / "added_tokens.json").write_text(json.dumps({"<img>": 92544, "</img>": 92545, "<IMG_CONTEXT>": 92546}))
    sizes = [(out / s).stat().st_size for s in shards]
    return {"tensors": n, "shards": len(shards), "largest_shard": max(sizes), "model_bytes": w.total_size}


def _child(phase: str, a: str, b: str) -> None:
    from v2pe_megatron.runtime.quiet import quiet_library_warnings

    quiet_library_warnings()
    from v2pe_megatron.convert.megatron import export_hf, import_hf

    t0 = time.time()
    if phase == "import":
        import_hf(a, b, progress=False)
    else:
        export_hf(a, b, layout="remote-code", progress=False, max_shard_bytes=int(os.environ["SHARD_BYTES"]))
    print(json.dumps({"seconds": time.time() - t0, "peak_rss": _peak_rss()}))


def _peak_rss() -> int:
    """This process's peak resident set since it started. ``VmHWM`` belongs to the address space,
    which exec replaces; ``ru_maxrss`` survives exec and so starts at the parent's size at the fork
    (the parent has just written the checkpoint: up to 3 GB counted against the child)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run(phase: str, a: Path, b: Path, shard_bytes: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               SHARD_BYTES=str(shard_bytes))
    r = subprocess.run([sys.executable, __file__, "--child", phase, str(a), str(b)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{phase} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _same(a: Path, b: Path) -> bool:
    from v2pe_megatron.convert.safetensors_io import SafetensorsReader

    ra, rb = SafetensorsReader(a), SafetensorsReader(b)
    if set(ra.keys()) != set(rb.keys()):
        return False
    import torch

    return all(torch.equal(ra.get(k), rb.get(k)) for k in ra.keys())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:5])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--shard-gb", type=float, default=1.0)
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    shard = int(args.shard_gb * (1 << 30))
    work = Path(tempfile.mkdtemp(prefix="convert_bench_", dir=args.workdir))
    try:
        t0 = time.time()
        info = write_checkpoint(work / "hf", args.dtype, shard)
        print(f"wrote {info['tensors']} tensors, {info['model_bytes'] / 1e9:.2f} GB {args.dtype} in {info['shards']} "
              f"shards (largest {info['largest_shard'] / 1e9:.2f} GB) in {time.time() - t0:.0f}s", flush=True)
        gb = 1 / 1e9
        for phase, a, b in (("import", work / "hf", work / "ck"), ("export", work / "ck", work / "out")):
            r = _run(phase, a, b, shard)
            print(f"{phase}: {r['seconds']:.1f}s, peak RSS {r['peak_rss'] * gb:.2f} GB = "
                  f"{r['peak_rss'] / info['largest_shard']:.2f} x largest shard, "
                  f"{r['peak_rss'] / info['model_bytes']:.2f} x model", flush=True)
        print(f"export bit-identical to the source: {'yes' if _same(work / 'hf', work / 'out') else 'NO'}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
