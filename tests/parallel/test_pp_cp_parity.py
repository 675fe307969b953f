"""Pipeline x context parallelism, and the Transformer Engine (thd) path under pipeline parallelism
with micro-batches of 2 rows, give the loss and gradients of one rank.

Two defects lived here: the loop told megatron's schedule ``seq_length // cp``, which the schedule
divides by cp again (PP x CP receive buffers of S/cp^2 tokens: "Received data size doesn't match");
and in thd the rows of a micro-batch travel as one flat [B*S/cp, 1, h] pack while the schedule was
told micro_batch_size=B. Both shapes now come from ``Layout.schedule_shape``.

The thd layouts build the real TE layer spec (megatron's TE wrappers) on ``testing.fake_te``, which
asserts Transformer Engine's contract (parameter names, 3-D q/k/v, int32 cu_seqlens on q's device,
padded cu_seqlens covering the whole pack under CP, integer max_seqlen, padding_causal) and computes
attention with our ring attention, so everything around TE (thd batches, megatron's THD rotary on
whole-pack V2PE frequencies, flattened stage buffers, image features under CP, TE's fused norms)
runs here. They run in fp32 to compare with the fp32 one-rank reference at 1e-5, with the fake's
``fp32_attention`` (real TE has no fp32 thd attention with CP: tests/model/test_fake_te.py).

Method as in test_model_parallel: the 1-rank model's weights go to every layout through a torch_dist
checkpoint (one set of names for both specs); each layout takes one real training step (DDP, 1F1B
schedule, ``vlm_forward_step`` on packed micro-batches with images and V2PE positions) and writes its
gradients as a checkpoint, which one process reads back into the 1-rank layout to compare tensor by
tensor.
"""

from __future__ import annotations

import os

import pytest
import torch

from v2pe_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.slow

SEQ = 64
ROWS = 2    # micro-batch size
MICRO = 2   # micro-batches per step
PAD = 4     # 2*cp for cp=2

# name, pp, cp, Transformer Engine spec (thd) on testing.fake_te, tp (with sequence parallelism)
LAYOUTS_4 = [("pp2cp2", 2, 2, False, 1), ("pp2cp2_thd", 2, 2, True, 1)]
LAYOUTS_2 = [("pp2_thd", 2, 1, True, 1), ("cp2_thd", 1, 2, True, 1), ("tp2sp_thd", 1, 1, True, 2)]


def _recipe(pp: int, cp: int, tp: int = 1):
    from v2pe_megatron.config import load_recipe

    return load_recipe(None, ["model.preset=tiny", f"data.seq_length={SEQ}", f"data.micro_batch_size={ROWS}",
                              f"data.global_batch_size={ROWS * MICRO}", f"parallel.pp={pp}", f"parallel.cp={cp}",
                              f"parallel.tp={tp}", f"parallel.sequence_parallel={str(tp > 1).lower()}",
                              "optimizer.name=sgd", "optimizer.clip_grad=0", "optimizer.weight_decay=0"])


def run_layout(tmp: str, name: str, pp: int, cp: int, te: bool, tp: int = 1) -> dict:
    torch.set_num_threads(1)
    import contextlib
    import dataclasses

    from megatron.core import dist_checkpointing

    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import Layout
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing import fake_te
    from v2pe_megatron.testing.tiny import synthetic_packs
    from v2pe_megatron.training.checkpointing import load_model_weights
    from v2pe_megatron.training.engine import build_optimizer, train_step, wrap_ddp
    from v2pe_megatron.training.forward import vlm_forward_step

    recipe = _recipe(pp, cp, tp)
    with model_parallel(tp=tp, pp=pp, cp=cp), (fake_te.installed(fp32_attention=True) if te else contextlib.nullcontext()):
        # the layout's rules for a TE run, the fp32 attention rule aside (see the module docstring)
        checked = dataclasses.replace(recipe.model, dtype="bf16") if te else recipe.model
        layout = Layout.from_config(recipe.parallel, world_size=torch.distributed.get_world_size(),
                                    spec="te" if te else "local").check(model=checked, seq_length=SEQ)
        torch.manual_seed(0)
        model = build_model(recipe.model, layout)
        weights = os.path.join(tmp, "weights")
        if name == "ref":
            os.makedirs(weights, exist_ok=True)
            dist_checkpointing.save(model.sharded_state_dict(), weights)
        else:
            load_model_weights(weights, model)
        ddp = wrap_ddp(model, model.config)
        opt = build_optimizer(recipe.optimizer, [ddp], params_dtype=torch.float32, lr=0.0)
        batches = synthetic_packs(MICRO, rows=ROWS, seq_length=SEQ, pad_multiple=PAD, seed=11)
        calls = fake_te.DotProductAttention.calls.get("thd", 0)
        res = train_step([ddp], opt, vlm_forward_step, iter(batches), num_microbatches=MICRO, layout=layout,
                         seq_length=SEQ, micro_batch_size=ROWS)
        with torch.no_grad():
            for p in ddp.module.parameters():
                p.copy_(p.main_grad)
        path = os.path.join(tmp, f"grads_{name}")
        os.makedirs(path, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), path)
        layers = len(getattr(getattr(model.language_model, "decoder", None), "layers", []))
    thd_calls = fake_te.DotProductAttention.calls.get("thd", 0) - calls
    return {"loss": res.loss, "tokens": res.num_tokens, "thd_calls": thd_calls,
            "layers": layers, "images": sum(b.num_images for b in batches)}


def run_layouts(tmp: str, layouts: list[tuple]) -> list[dict]:
    return [run_layout(tmp, *lay) for lay in layouts]


def compare(tmp: str, names: list[str]) -> dict:
    torch.set_num_threads(1)
    from megatron.core import dist_checkpointing

    from v2pe_megatron.model.checkpoint_names import retarget
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import Layout
    from v2pe_megatron.runtime.distributed import model_parallel

    out = {}
    with model_parallel():
        model = build_model(_recipe(1, 1).model, Layout())
        ref = dist_checkpointing.load(model.sharded_state_dict(), os.path.join(tmp, "grads_ref"))
        for name in names:
            path = os.path.join(tmp, f"grads_{name}")
            got = dist_checkpointing.load(retarget(model.sharded_state_dict(), path), path)
            diffs = {k: float((got[k] - r).abs().max()) for k, r in ref.items()
                     if torch.is_tensor(r) and not k.endswith("_extra_state")}
            scale = max(float(r.abs().max()) for r in ref.values() if torch.is_tensor(r))
            out[name] = {"max_abs": max(diffs.values()), "worst": max(diffs, key=diffs.get), "scale": scale,
                         "n": len(diffs)}
        out["nonzero"] = sum(int(r.abs().max() > 0) for k, r in ref.items()
                             if torch.is_tensor(r) and k.startswith("vision_model."))
    return out


@pytest.mark.timeout(900)
def test_pp_x_cp_and_thd_pp_microbatch2_match_one_rank(tmp_path):
    """Also the TE spec at TP=2 with sequence parallelism: the fake's tensor-parallel collectives and
    megatron's TE wrappers' checkpoint sharding (weights in, gradients out at TP=2)."""
    tmp = str(tmp_path)
    ref = run_distributed(run_layout, 1, tmp, "ref", 1, 1, False, 1, timeout=300)[0]
    assert ref["images"] > 0 and ref["layers"] == 4
    four = run_distributed(run_layouts, 4, tmp, LAYOUTS_4, timeout=600)
    two = run_distributed(run_layouts, 2, tmp, LAYOUTS_2, timeout=400)
    cmp = run_distributed(compare, 1, tmp, [lay[0] for lay in LAYOUTS_4 + LAYOUTS_2], timeout=300)[0]
    assert cmp["nonzero"] > 0  # images reached the vision tower in the reference
    for layouts, results in ((LAYOUTS_4, four), (LAYOUTS_2, two)):
        for i, (name, pp, cp, te, tp) in enumerate(layouts):
            for rank_result in results:
                got = rank_result[i]
                assert got["tokens"] == ref["tokens"], (name, got)
                assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (name, got["loss"], ref["loss"])
                assert got["layers"] == 4 // pp  # each stage built its share of the LLM
            if te:  # the thd path really ran, on every rank that holds layers
                assert all(r[i]["thd_calls"] > 0 for r in results), (name, [r[i]["thd_calls"] for r in results])
            c = cmp[name]
            assert c["max_abs"] <= 1e-5 * c["scale"], (name, c)
