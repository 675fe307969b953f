"""Checkpoint cost per rank against the data-parallel size: peak resident memory during a save and
bytes read during a resume, with the distributed optimizer (gloo, CPU), DP = 1, 2, 4.

Two ways to write and read the same checkpoint (megatron's ``fully_reshardable`` tensors, see
``training/optimizer_state.py``):

- ``project``: ``training/checkpointing.py`` as it is (every DP rank writes and reads the parameter
  ranges it owns; weights spread over the DP ranks by megatron's fully parallel wrappers);
- ``megatron``: megatron's own ``fully_reshardable`` writer and reader, as this project used them
  before (``get_parameter_state_dp_zero(return_on_all_ranks=True)`` on save, whole tensors on load,
  plain ``dist_checkpointing.save/load``); same manifest and verification.

Each phase runs in fresh rank processes: the save phase builds the model and the optimizer state,
then measures the save; the resume phase (after the checkpoint's pages are dropped from the page
cache with ``posix_fadvise(DONTNEED)``) builds them again and measures the resume (manifest
verification included). Per rank: the save's peak is VmHWM (reset through /proc/self/clear_refs)
minus VmRSS just before it; bytes come from /proc/self/io: ``rchar`` counts every byte passed to
read()/pread() (files, page cache or not; gloo receives with recv(), which it does not count),
``read_bytes`` what came from the disk, ``write_bytes`` what went to files; gloo sends with writev(),
counted in ``wchar``, so ``wchar - write_bytes`` is what the rank sent to the others.

    .venv/bin/python benchmarks/checkpoint.py [--dp 1 2 4] [--hidden 256] [--layers 4]

The last line is ``DP4/DP1 per rank (project): save peak <r>, resume bytes read <r>``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import release_memory, reset_peak, status_kib  # noqa: E402

META = {"distrib_optim_sharding_type": "fully_reshardable"}
MIB = 1 << 20


def _io() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        k, v = line.split(":")
        out[k] = int(v)
    return out


def _build(hidden: int, layers: int):
    from v2pe_megatron.testing import tiny
    from v2pe_megatron.training import checkpointing as ckpt
    from v2pe_megatron.training.engine import build_optimizer, wrap_ddp

    recipe = tiny.tiny_recipe("parallel.use_distributed_optimizer=true", "optimizer.name=adam",
                              f"model.language.hidden_size={hidden}", f"model.language.ffn_hidden_size={4 * hidden}",
                              f"model.language.num_layers={layers}")
    torch.manual_seed(0)
    model = tiny.build_language_model(recipe)
    ddp = wrap_ddp(model, model.config, use_distributed_optimizer=True)
    opt = build_optimizer(recipe.optimizer, [ddp], params_dtype=torch.float32, use_distributed_optimizer=True)
    ckpt._ensure_optimizer_state(opt)
    for group in opt.chained_optimizers[0].optimizer.state.values():  # non-zero state, as after training
        for v in group.values():
            if torch.is_tensor(v) and v.dim():
                v.uniform_()
    return model, ddp, opt


def _megatron_save(root: str, model, opt) -> None:
    from megatron.core import dist_checkpointing

    from v2pe_megatron.training import checkpointing as ckpt

    path = ckpt.iteration_dir(root, 1)
    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True)
    torch.distributed.barrier()
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd, "iteration": 1, "extra": {},
             "optimizer": opt.sharded_state_dict(model_sd, is_loading=False, metadata=META)}
    dist_checkpointing.save(state, str(path), content_metadata=META)
    torch.distributed.barrier()
    ckpt.write_manifest(path)
    if torch.distributed.get_rank() == 0:
        (Path(root) / "latest").write_text("1")
    torch.distributed.barrier()


def _megatron_load(root: str, model, opt) -> None:
    from megatron.core import dist_checkpointing

    from v2pe_megatron.training import checkpointing as ckpt

    it = ckpt.find_resumable(root)  # the manifest verification, as load_checkpoint does it
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, is_loading=True, metadata=META)}
    loaded = dist_checkpointing.load(state, str(ckpt.iteration_dir(root, it)))
    model.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])


def bench_rank(phase: str, way: str, root: str, hidden: int, layers: int) -> dict:
    from v2pe_megatron.runtime import megatron_writer
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.training import checkpointing as ckpt

    torch.set_num_threads(1)
    megatron_writer.activate()  # the same in-process writer for both ways
    with model_parallel(1, 1, seed=1):
        model, ddp, opt = _build(hidden, layers)
        state_mib = sum(t.numel() * 4 for g in opt.chained_optimizers[0].optimizer.state.values()
                        for t in g.values() if torch.is_tensor(t) and t.dim()) / MIB
        release_memory()
        torch.distributed.barrier()
        base, io0 = status_kib("VmRSS"), _io()
        reset_peak()
        t0 = time.perf_counter()
        if phase == "save":
            if way == "project":
                ckpt.save_checkpoint(root, 1, [ddp], opt)
            else:
                _megatron_save(root, model, opt)
        elif way == "project":
            ckpt.load_checkpoint(root, [ddp], opt)
        else:
            _megatron_load(root, model, opt)
        seconds = time.perf_counter() - t0
        peak, io1 = status_kib("VmHWM") - base, _io()
        torch.distributed.barrier()
    return {"peak_mib": peak / 1024, "seconds": seconds, "state_mib": state_mib,
            **{k: (io1[k] - io0[k]) / MIB for k in ("rchar", "wchar", "read_bytes", "write_bytes")}}


def _drop_page_cache(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--hidden", type=int, default=256, help="LLM hidden size (ffn 4x); tiny preset otherwise")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ways", nargs="+", default=["project", "megatron"], choices=["project", "megatron"])
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args(argv)
    if 1 not in args.dp:
        ap.error("--dp must include 1 (the ratios are against it)")
    from v2pe_megatron.testing.distributed import run_distributed

    work = Path(tempfile.mkdtemp(prefix="ckpt_bench_", dir=args.dir))
    rows: dict[tuple[str, int], dict] = {}
    try:
        for way in args.ways:
            for dp in args.dp:
                root = work / f"{way}_dp{dp}"
                t0 = time.perf_counter()
                save = run_distributed(bench_rank, dp, "save", way, str(root), args.hidden, args.layers, timeout=1800)
                _drop_page_cache(root)
                load = run_distributed(bench_rank, dp, "load", way, str(root), args.hidden, args.layers, timeout=1800)
                size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / MIB
                rows[(way, dp)] = {"save": save, "load": load, "size": size}
                shutil.rmtree(root)
                print(f"# {way} dp={dp}: {time.perf_counter() - t0:.0f} s wall", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    state = rows[(args.ways[0], 1)]["save"][0]["state_mib"]
    size = rows[(args.ways[0], 1)]["size"]
    print(f"LM hidden {args.hidden}, {args.layers} layers, ffn {4 * args.hidden}, vocab 512, fp32, Adam, distributed "
          f"optimizer over DP (gloo, 1 thread per rank); optimizer state {state:.1f} MiB (exp_avg + exp_avg_sq), "
          f"checkpoint {size:.1f} MiB")
    print("per rank, max over ranks: save peak = resident memory above the built model and optimizer; written = "
          "write_bytes; sent = wchar - write_bytes (gloo); save read = bytes hashed (rchar); resume read = rchar "
          "(read_bytes from disk in brackets); MiB")
    head = "| way | DP | save peak | save written | save sent | save read | save s | resume read | resume peak " \
           "| resume s | save peak / DP1 | resume read / DP1 |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for way in args.ways:
        one = rows[(way, 1)]
        for dp in args.dp:
            r = rows[(way, dp)]
            s = {k: max(x[k] for x in r["save"]) for k in r["save"][0]}
            lo = {k: max(x[k] for x in r["load"]) for k in r["load"][0]}
            s1 = max(x["peak_mib"] for x in one["save"])
            l1 = max(x["rchar"] for x in one["load"])
            sent = max(0.0, max(x["wchar"] - x["write_bytes"] for x in r["save"]))
            print(f"| {way} | {dp} | {s['peak_mib']:.1f} | {s['write_bytes']:.1f} | {sent:.1f} | {s['rchar']:.1f} | "
                  f"{s['seconds']:.2f} | "
                  f"{lo['rchar']:.1f} ({lo['read_bytes']:.1f}) | {lo['peak_mib']:.1f} | {lo['seconds']:.2f} | "
                  f"{s['peak_mib'] / s1:.2f} | {lo['rchar'] / l1:.2f} |")
    top = max(args.dp)
    if "project" in args.ways and top > 1:
        r, one = rows[("project", top)], rows[("project", 1)]
        print(f"DP{top}/DP1 per rank (project): save peak "
              f"{max(x['peak_mib'] for x in r['save']) / max(x['peak_mib'] for x in one['save']):.2f}, "
              f"resume bytes read {max(x['rchar'] for x in r['load']) / max(x['rchar'] for x in one['load']):.2f}")


if __name__ == "__main__":
    main()
