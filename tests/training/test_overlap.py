"""Data-parallel communication overlapped with compute (``training/engine.py``) trains exactly like
the non-overlapped step: same losses, gradient norms, weights and Adam moments, step after step.

The overlapped run uses small gradient buckets (many per model chunk) and *late-landing* async
collectives: an all-gather or reduce started with ``async_op`` writes its result only when it is
waited for (the latest moment NCCL allows), so a forward that reads a parameter before its bucket's
all-gather was waited for, a gradient read before ``finish_grad_sync``, or a gradient added to a
bucket after its reduction started, would all show as a difference. The data mixes micro-batches
with and without images, so DP ranks run different backward graphs (the vision tower gets a zero
gradient on text-only micro-batches): the order in which ranks issue their bucket collectives is
checked too (a mismatch hangs gloo or mixes buckets up). One step has a NaN loss: skipped, it must
change nothing, and the all-gather after it must not either. Frozen parts (the vision tower) and
an interleaved pipeline with data parallelism are covered.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import pytest
import torch

from v2pe_megatron.testing.distributed import run_distributed
from v2pe_megatron.testing.poison import nan_loss

SEQ, BUCKET = 64, 4000           # parameters per bucket: ~30 buckets on the tiny InternVL
NAN_STEP, STEPS = 1, 4           # step 1 has a NaN loss and is skipped


class _Landing:
    """A work handle whose collective's result is written into the buffers at wait()."""

    def __init__(self, pairs, log, kind):
        self.pairs, self.log, self.kind = pairs, log, kind

    def wait(self):
        with torch.no_grad():
            for dst, val in self.pairs:
                dst.copy_(val)
        # a forward pre-hook waiting for its bucket, or the engine's wait for what is left
        drained = any(f.function == "_finish_param_gather" for f in inspect.stack(0))
        self.log.append(self.kind + (" drained" if drained else ""))
        self.pairs = []


@contextlib.contextmanager
def late_landing(log: list):
    """megatron's async bucket collectives complete when started (gloo on a tiny model would anyway)
    but their results land in the buffers only at ``wait()``; ``log`` records each landing."""
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup as Group

    start_param, start_grad = Group.start_param_sync, Group.start_grad_sync

    def deferred(start, attr, buffer, kind):
        def run(self, *args, **kwargs):
            before = [getattr(b, buffer).clone() for b in self.buckets]
            start(self, *args, **kwargs)
            handle = getattr(self, attr)
            if handle is not None and not isinstance(handle, _Landing):
                handle.wait()
                after = [getattr(b, buffer).clone() for b in self.buckets]
                with torch.no_grad():
                    for b, old in zip(self.buckets, before):
                        getattr(b, buffer).copy_(old)
                setattr(self, attr, _Landing([(getattr(b, buffer), a) for b, a in zip(self.buckets, after)],
                                             log, kind))
        return run

    Group.start_param_sync = deferred(start_param, "param_gather_handle", "param_data", "param")
    Group.start_grad_sync = deferred(start_grad, "grad_reduce_handle", "grad_data", "grad")
    try:
        yield
    finally:
        Group.start_param_sync, Group.start_grad_sync = start_param, start_grad


def _micro_batches(step: int, world_dp: int) -> list:
    """The step's global batch of 2 micro-batches per DP rank: the last DP rank's are text-only, the
    others' have images, so that rank runs no vision forward at all and a different backward."""
    from v2pe_megatron.testing.tiny import synthetic_packs

    packs = synthetic_packs(60, rows=1, seq_length=SEQ, pad_multiple=1, seed=2)
    img = [b for b in packs if b.pixel_values is not None and b.pixel_values.shape[0] > 0]
    txt = [b for b in packs if b.pixel_values is None or b.pixel_values.shape[0] == 0]
    out = []
    for i in range(2):
        out += img[(step * 2 + i) * (world_dp - 1):(step * 2 + i + 1) * (world_dp - 1)] + [txt[(step * 2 + i) % len(txt)]]
    assert len(out) == 2 * world_dp   # rank r takes out[r::world_dp]
    return out


def _moments(opt, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Adam's moments of every trained parameter, whole (the distributed optimizer holds a range of
    each on each rank, set by the bucket layout: summed over the data-parallel ranks here)."""
    from megatron.core import parallel_state as ps

    full = {p: torch.zeros(2, p.numel()) for p in params if p.requires_grad}
    sharded = False
    for o in getattr(opt, "chained_optimizers", [opt]):
        if hasattr(o, "shard_fp32_groups"):
            sharded = True
            for models, shards in zip(o.model_fp32_groups, o.shard_fp32_groups):
                for p, shard in zip(models, shards):
                    r, st = o._get_model_param_range_map(p)["param"], o.optimizer.state.get(shard, {})
                    for i, k in enumerate(("exp_avg", "exp_avg_sq")):
                        if k in st:
                            full[p][i, r.start:r.end] = st[k].view(-1)
        else:
            for p, st in o.optimizer.state.items():
                full[p] = torch.stack([st["exp_avg"].view(-1), st["exp_avg_sq"].view(-1)]).clone()
    out = [full[p] for p in params if p in full]
    if sharded:
        flat = torch.cat([t.view(-1) for t in out])
        torch.distributed.all_reduce(flat, group=ps.get_data_parallel_group())
        out = list(flat.split([t.numel() for t in out]))
    return out


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and a
    return max(float((x - y).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b))


def _run_pair(pp: int, vpp: int, distopt: bool, freeze_vision: bool) -> dict:
    """On this rank: the same steps without and with overlap, from the same weights."""
    from megatron.core import parallel_state as ps

    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.runtime import distributed as rt
    from v2pe_megatron.testing.tiny import layout_of, tiny_recipe
    from v2pe_megatron.training import engine
    from v2pe_megatron.training.engine import build_optimizer, sync_params, train_step, wrap_ddp
    from v2pe_megatron.training.forward import vlm_forward_step

    recipe = tiny_recipe(f"data.seq_length={SEQ}", "optimizer.lr=1e-2", f"parallel.pp={pp}",
                         f"parallel.virtual_pp={vpp}", f"parallel.use_distributed_optimizer={distopt}")
    rt.initialize_model_parallel(1, pp, 1, seed=5, vpp=vpp)
    layout = layout_of(recipe)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()

    def build():
        chunks = [build_model(recipe.model, layout, vp_stage=i if vpp > 1 else None) for i in range(vpp)]
        for m in chunks:
            m.freeze(vision=freeze_vision)
        return chunks

    base_chunks = build()
    over_chunks = build()
    for a, b in zip(base_chunks, over_chunks):
        b.load_state_dict(a.state_dict())

    issued_at_finalize: list[tuple[int, int]] = []   # (bucket groups issued before finalize, all)
    landed_at_finalize: list[int] = []                # parameter all-gathers waited for in the forward
    log: list = []
    real_finalize = engine.finalize_model_grads

    def finalize(model, *args, **kwargs):
        groups = [g for m in model for g in m.bucket_groups]
        issued_at_finalize.append((sum(g.grad_reduce_handle is not None for g in groups), len(groups)))
        landed_at_finalize.append(log.count("param"))          # the drained ones are "param drained"
        return real_finalize(model, *args, **kwargs)

    def run(chunks, overlap: bool) -> dict:
        ddp = [wrap_ddp(m, m.config, use_distributed_optimizer=distopt, disable_bucketing=i > 0,
                        overlap_grad_reduce=overlap, overlap_param_gather=overlap, bucket_size=BUCKET)
               for i, m in enumerate(chunks)]
        opt = build_optimizer(recipe.optimizer, ddp, params_dtype=torch.float32, use_distributed_optimizer=distopt)
        out = {"loss": [], "grad_norm": [], "ok": [], "issued": [], "landed": [], "buckets": len(ddp[0].bucket_groups)}
        params = [p for m in chunks for p in m.parameters()]
        for step in range(STEPS):
            mine = _micro_batches(step, dp)[dp_rank::dp]
            forward = nan_loss(vlm_forward_step) if step == NAN_STEP else vlm_forward_step
            issued_at_finalize.clear()
            landed_at_finalize.clear()
            log.clear()
            res = train_step(ddp, opt, forward, iter(mine), num_microbatches=len(mine), layout=layout,
                             seq_length=SEQ, micro_batch_size=1)
            out["loss"].append(res.loss)
            out["grad_norm"].append(res.grad_norm)
            out["ok"].append(res.update_successful)
            out["issued"].append(list(issued_at_finalize))
            out["landed"].append(sum(landed_at_finalize))
            if step in (NAN_STEP - 1, NAN_STEP):
                sync_params(ddp)
                out[f"params_after_{step}"] = [p.detach().clone() for p in params]
                out[f"state_after_{step}"] = _moments(opt, params)
        out["unsynced"] = [p.detach().clone() for p in params]
        sync_params(ddp)
        out["params"] = [p.detach().clone() for p in params]
        out["state"] = _moments(opt, params)
        return out

    frozen_before = [p.detach().clone() for m in over_chunks for p in m.parameters() if not p.requires_grad]
    engine.finalize_model_grads = finalize
    try:
        base = run(base_chunks, False)
        with late_landing(log):
            over = run(over_chunks, True)
    finally:
        engine.finalize_model_grads = real_finalize
    frozen_after = [p.detach().clone() for m in over_chunks for p in m.parameters() if not p.requires_grad]
    pp_rank = ps.get_pipeline_model_parallel_rank()
    rt.destroy_model_parallel()
    return {
        "pp_rank": pp_rank, "text_only": dp_rank == dp - 1,
        "base_loss": base["loss"], "over_loss": over["loss"], "ok": over["ok"], "base_ok": base["ok"],
        "grad_norm_diff": max(abs(a - b) for a, b in zip(base["grad_norm"], over["grad_norm"])
                              if a is not None and math.isfinite(a)),
        "param_diff": _max_diff(base["params"], over["params"]),
        "state_diff": _max_diff(base["state"], over["state"]),
        "unsynced_diff": _max_diff(base["params"], over["unsynced"]),
        "nan_step_param_diff": _max_diff(over[f"params_after_{NAN_STEP - 1}"], over[f"params_after_{NAN_STEP}"]),
        "nan_step_state_diff": _max_diff(over[f"state_after_{NAN_STEP - 1}"], over[f"state_after_{NAN_STEP}"]),
        "moved": _max_diff(over[f"params_after_{NAN_STEP - 1}"], over["params"]),
        "issued_base": base["issued"], "issued_over": over["issued"], "buckets": over["buckets"],
        "landed_in_forward": over["landed"],
        "frozen": len(frozen_before),
        "frozen_diff": _max_diff(frozen_before, frozen_after) if frozen_before else 0.0,
    }


def _dp2_cases() -> dict:
    return {name: _run_pair(1, 1, distopt, freeze) for name, (distopt, freeze) in DP2_CASES.items()}


DP2_CASES = {"dp2": (False, False), "dp2_distopt": (True, False), "dp2_distopt_frozen_vision": (True, True)}
TOL = 1e-6


def _check(r: dict, name: str, *, distopt: bool, bucketed: bool) -> None:
    assert r["ok"] == r["base_ok"] == [i != NAN_STEP for i in range(STEPS)], name
    for a, b in zip(r["base_loss"], r["over_loss"]):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= TOL, (name, r["base_loss"], r["over_loss"])
    assert r["grad_norm_diff"] <= 1e-5, (name, r["grad_norm_diff"])
    assert r["param_diff"] <= TOL and r["state_diff"] <= TOL, (name, r["param_diff"], r["state_diff"])
    assert r["moved"] > 1e-4, name                  # training did change the weights
    assert r["nan_step_param_diff"] == 0.0 and r["nan_step_state_diff"] == 0.0, name
    # overlapped: from the second step on (megatron's first one records which gradients to wait for)
    # every bucket's reduction was issued during the backward, before finalize_model_grads; never without
    assert all(i == 0 for issued in r["issued_base"] for i, _ in issued), name
    for issued in r["issued_over"][1:]:
        assert all(i == n for i, n in issued), (name, r["issued_over"])
    if bucketed:
        assert r["buckets"] > 5, (name, r["buckets"])
    if distopt:
        # the update reaches other ranks' copies only with the next forward's all-gather ...
        assert r["unsynced_diff"] > 1e-4, name
        # ... which the forward waits for, bucket by bucket; a text-only rank's vision buckets only
        # before the gradients are reduced
        assert all(n > 0 for n in r["landed_in_forward"]), (name, r["landed_in_forward"])
        if bucketed and r["text_only"]:
            assert all(n < r["buckets"] for n in r["landed_in_forward"]), (name, r["landed_in_forward"])


@pytest.fixture(scope="module")
def dp2():
    return run_distributed(_dp2_cases, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DP2_CASES))
def test_overlap_matches_no_overlap_dp2(dp2, name):
    distopt, frozen = DP2_CASES[name]
    for rank in dp2:
        r = rank[name]
        _check(r, name, distopt=distopt, bucketed=True)
        if frozen:
            assert r["frozen"] > 0 and r["frozen_diff"] == 0.0


@pytest.mark.slow
def test_overlap_matches_no_overlap_interleaved_pp2_dp2():
    out = run_distributed(_run_pair, 4, 2, 2, True, False)
    for r in out:
        # megatron buckets only the first stage's first model chunk; the others reduce in one piece
        _check(r, "pp2_vpp2_dp2_distopt", distopt=True, bucketed=r["pp_rank"] == 0)


@pytest.mark.slow   # one process, but two models and six steps: ~7 s
def test_grad_reductions_are_issued_in_one_order_with_and_without_images():
    """The order in which a rank issues its bucket reductions does not depend on its data (a rank
    whose last micro-batch is text-only issues them like one with images); megatron's own DDP,
    which issues a bucket when its gradients are complete, does not keep that order."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup as Group

    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing.tiny import layout_of, tiny_recipe
    from v2pe_megatron.training import engine
    from v2pe_megatron.training.engine import build_optimizer, train_step, wrap_ddp
    from v2pe_megatron.training.forward import vlm_forward_step

    recipe = tiny_recipe(f"data.seq_length={SEQ}", "optimizer.lr=1e-2", "parallel.use_distributed_optimizer=true")
    two = _micro_batches(0, 2) + _micro_batches(1, 2)
    img, txt, img2 = two[0], two[1], two[2]
    issued: list = []
    index: dict = {}
    start = Group.start_grad_sync

    def recording(self, *args, **kwargs):
        issued.append(index[self])
        return start(self, *args, **kwargs)

    def orders(make_ddp) -> tuple[list, list, list]:
        with model_parallel(seed=0):
            layout = layout_of(recipe)
            model = build_model(recipe.model, layout)
            Group.start_grad_sync = recording
            try:
                ddp = make_ddp(model)
                index.update({g: i for i, g in enumerate(ddp.bucket_groups)})
                opt = build_optimizer(recipe.optimizer, [ddp], params_dtype=torch.float32,
                                      use_distributed_optimizer=True)
                seen = []
                for b in (img, img2, txt):       # the first step issues every bucket after the backward
                    issued.clear()
                    train_step([ddp], opt, vlm_forward_step, iter([b]), num_microbatches=1, layout=layout,
                               seq_length=SEQ, micro_batch_size=1)
                    seen.append(list(issued))
                gather = [index[g] for g in engine._gather_order(ddp)]
                tower = set(model.vision_model.parameters()) | set(model.projector.parameters())
                reads = [bool(tower & ddp.bucket_groups[i].params) for i in gather]
            finally:
                Group.start_grad_sync = start
            return seen[1], seen[2], (gather, reads)

    ours_img, ours_txt, (gather, tower) = orders(lambda m: wrap_ddp(m, m.config, use_distributed_optimizer=True,
                                                           bucket_size=BUCKET))
    assert len(ours_img) > 20 and sorted(ours_img) == list(range(len(ours_img)))
    assert ours_img == ours_txt
    # the order a backward completes the buckets: the reverse of the order the forward reads them in,
    # which starts with the token embedding, then the vision tower and projector (registered after the
    # whole LLM), then the LLM's layers
    assert ours_img == gather[::-1]
    # (the embedding's bucket is the last megatron made: buckets follow the reverse registration order)
    k = sum(tower)
    assert gather[0] == len(gather) - 1 and k > 3 and tower == [False] + [True] * k + [False] * (len(tower) - 1 - k)

    def megatron_ddp(m):
        cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True,
                                            use_distributed_optimizer=True, bucket_size=BUCKET)
        return DistributedDataParallel(config=m.config, ddp_config=cfg, module=m)

    theirs_img, theirs_txt, _ = orders(megatron_ddp)
    assert sorted(theirs_img) == sorted(theirs_txt) and theirs_img != theirs_txt


def test_recipe_keys_reach_the_layout():
    """``parallel.overlap_grad_reduce`` / ``overlap_param_gather`` (both on by default) are read once,
    into the layout the loop hands to ``wrap_ddp`` and the planner times; the all-gather overlaps
    only with the distributed optimizer and overlapped gradient reduction."""
    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.parallel.layout import Layout

    def layout(*keys):
        return Layout.from_config(load_recipe(None, list(keys)).parallel)

    on = layout("parallel.use_distributed_optimizer=true")
    assert on.overlap_grad_reduce and on.overlap_param_gather and on.param_gather_overlapped
    assert not layout().param_gather_overlapped                       # no distributed optimizer
    off = layout("parallel.use_distributed_optimizer=true", "parallel.overlap_grad_reduce=false")
    assert not off.overlap_grad_reduce and not off.param_gather_overlapped
    no_gather = layout("parallel.use_distributed_optimizer=true", "parallel.overlap_param_gather=false")
    assert no_gather.overlap_grad_reduce and not no_gather.param_gather_overlapped
