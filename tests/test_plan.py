"""The planner's formulas against hand calculations for InternVL2-2B, and the search's promises:
every listed layout is valid and fits, the recommended one is the fastest, nothing-fits says what would."""

from __future__ import annotations

import dataclasses

import math

import pytest

from v2pe_megatron.config import PRESETS, RecipeError
from v2pe_megatron.flops import step_flops
from v2pe_megatron.parallel.layout import Layout
from v2pe_megatron.plan import (GIB, Cluster, activation_bytes, memory_breakdown, model_config, param_counts, plan,
                                recipe_dict, step_time)

M = model_config("internvl2-2b")
# InternVL2-2B: LLM h=2048, 16 heads of 128, 8 KV groups, ffn 8192, vocab 92553, 24 layers;
# InternViT-300M: c=1024, 16 heads, ffn 4096, 24 layers, 448 px tiles of 14 px patches (1024 + CLS).
H, D, KV, F, V, L = 2048, 128, 8 * 128, 8192, 92553, 24
C, FV, NV, NH = 1024, 4096, 1025, 16


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_param_counts_sum_to_the_models_count(preset):
    from v2pe_megatron.model.internvl import parameter_count

    cfg = model_config(preset)
    pc = param_counts(cfg)
    total = pc["vision"] + pc["projector"] + pc["embedding"] + cfg.language.num_layers * pc["layer"] \
        + pc["final_norm"] + pc["output"]
    assert total == parameter_count(cfg)


def test_internvl2_2b_parameters_by_hand():
    pc = param_counts(M)
    # one LLM layer: two RMSNorm weights, qkv (2048 -> 16*128 + 2*8*128), proj, gate/up/down
    assert pc["layer"] == 2 * H + H * (H + 2 * KV) + H * H + 3 * H * F
    assert pc["embedding"] == pc["output"] == V * H
    assert 2.1e9 < sum(pc.values()) + (L - 1) * pc["layer"] < 2.3e9   # "2B"


def _one_layer(**kw):
    kw = {"tokens": 1000, "tiles": 0, "layers": 1, "first_stage": False, "last_stage": False, **kw}
    return activation_bytes(M, **kw).llm_layers


def test_llm_layer_gpu_path_by_hand():
    # bf16: 2 norm inputs + 2 norm outputs (4h), q + k + the qkv buffer + out (3h + 3kv), SwiGLU (5f);
    # fp32: 2 rsigma + the log-sum-exp per head. The rotary cos/sin are not per layer (see below).
    per_token = (4 * H + 3 * H + 3 * KV + 5 * F) * 2 + (2 + 16) * 4
    assert _one_layer() == 1000 * per_token
    # tp=2 with SP: everything is split
    per_token = ((4 * H) / 2 + (3 * H + 3 * KV + 5 * F) / 2) * 2 + (2 / 2 + 16 / 2) * 4
    assert _one_layer(tp=2, sp=True) == pytest.approx(1000 * per_token)
    # tp=2 without SP: the norm parts stay whole
    per_token = (4 * H + (3 * H + 3 * KV + 5 * F) / 2) * 2 + (2 + 8) * 4
    assert _one_layer(tp=2) == pytest.approx(1000 * per_token)
    # selective: the attention is recomputed, its log-sum-exp is not kept (flash keeps no [s, s] anyway)
    assert _one_layer(recompute="selective") == 1000 * ((4 * H + 3 * H + 3 * KV + 5 * F) * 2 + 2 * 4)
    # CP divides the tokens
    assert _one_layer(cp=4) == _one_layer() / 4


def test_rotary_cos_sin_once_per_micro_batch():
    """cos and sin ([s, d] each, the compute dtype) are made once per micro-batch and shared by every
    layer: saved for backward without recompute, held outside autograd's saved tensors with it."""
    def rotary(**kw):
        a = activation_bytes(M, tokens=1000, tiles=0, first_stage=False, last_stage=False, **kw)
        return a.llm_other, a.rotary_held
    assert rotary(layers=1) == rotary(layers=L) == (1000 * 2 * D * 2, 0.0)
    assert rotary(layers=L, tp=2, sp=True) == (1000 * 2 * D * 2, 0.0)   # replicated over tp
    assert rotary(layers=L, recompute="full") == (0.0, 1000 * 2 * D * 2)
    assert rotary(layers=L, recompute="selective") == (0.0, 1000 * 2 * D * 2)
    assert rotary(layers=0) == (0.0, 0.0)                                 # a stage without LLM layers


def test_full_recompute_keeps_layer_inputs():
    a = activation_bytes(M, tokens=4096, tiles=0, recompute="full", first_stage=False, last_stage=False)
    assert a.llm_layers == 4096 * L * H * 2
    # one layer re-run in backward, as without recompute
    assert a.transient == _one_layer(tokens=4096)


def test_llm_layer_cpu_path_by_hand():
    # local spec, fp32: 2 x (norm input, normalised, linear input) = 6h, SDPA with grouped K/V
    # repeated (q, k, v, out, linear_proj's input = 5h) + lse, SwiGLU 5f, 2 rstd.
    per_token = (6 * H + 5 * H + 5 * F) * 4 + (2 + 16) * 4
    assert _one_layer(dtype="fp32", path="local") == 1000 * per_token
    # ring attention (CP > 1): fp32 q, stacked k/v, out, lse; linear_proj's input in the dtype
    ring = (6 * H + H + 5 * F) * 2 + (2 + 2 * H + 2 * KV + 16) * 4
    assert _one_layer(path="local", cp=2) == pytest.approx(1000 / 2 * ring)


def test_vision_tower_by_hand():
    a = activation_bytes(M, tokens=0, tiles=3, first_stage=True, last_stage=False, layers=0)
    per_tile = 3 * 448 * 448 * 2 + L * NV * ((10 * C + 2 * FV) * 2 + (4 + NH) * 4)
    assert a.vision == 3 * per_tile
    full = activation_bytes(M, tokens=0, tiles=3, recompute="full", layers=0, last_stage=False)
    assert full.vision == 3 * (3 * 448 * 448 * 2 + L * NV * C * 2)
    # CP: each rank encodes ceil(tiles / cp) tiles
    assert activation_bytes(M, tokens=0, tiles=3, cp=2, layers=0, last_stage=False).vision == 2 * per_tile
    # projector: 256 tokens per tile; LN input + output (4096 wide), GELU input, linear_2 input, fp32 mean/rstd
    assert a.projector == 3 * 256 * ((2 * 4096 + 2 * H) * 2 + 8)


def test_embedding_side_under_tp_and_sp():
    # int64 ids; tp > 1: the vocab-parallel embedding's bool mask; SP: the first layer's view keeps the whole
    # merged [s, h] embeddings alive (the scatter slices without a copy), 1 - 1/tp of them beyond the shard
    kw = dict(tokens=1000, tiles=0, layers=0, last_stage=False)
    assert activation_bytes(M, **kw).llm_other == 1000 * 8
    assert activation_bytes(M, tp=2, **kw).llm_other == 1000 * (8 + 1)
    assert activation_bytes(M, tp=2, sp=True, **kw).llm_other == 1000 * (8 + 1 + H / 2 * 2)


def test_logits_and_chunked_loss():
    a = activation_bytes(M, tokens=8192, tiles=0, tp=2, layers=0, first_stage=False)
    assert a.logits == 8192 * (V / 2 * 4 + 1 + 8)           # fp32 softmax, bool mask, int64 target
    assert a.logits_transient == 8192 * V / 2 * 2           # the bf16 logits beside it
    c = activation_bytes(M, tokens=8192, tiles=0, tp=2, layers=0, first_stage=False, loss_chunk_tokens=1024)
    assert c.logits == 0 and c.logits_transient == 1024 * V / 2 * (2 + 8)


def test_memory_breakdown_by_hand():
    pc = param_counts(M)
    per_gpu = (sum(pc.values()) + (L - 1) * pc["layer"]) / 2              # tp=2, pp=1
    lay = Layout(tp=2, cp=4, dp=4, sp=True, spec="te", distributed_optimizer=True)
    m = memory_breakdown(M, lay, seq_length=32768, micro_batch_size=1, tiles=64, microbatches=8, recompute="none")
    assert m.parameters == pytest.approx(per_gpu * 2, rel=1e-6)          # bf16, final norm replicated
    assert m.gradients == pytest.approx(per_gpu * 4, rel=1e-6)           # fp32 main grads
    assert m.optimizer == pytest.approx(per_gpu * 12 / 16, rel=1e-6)     # master + m + v over dp*cp = 16
    plain = memory_breakdown(M, Layout(tp=2, cp=4, dp=4, sp=True, spec="te"), seq_length=32768, micro_batch_size=1,
                             tiles=64, microbatches=8, recompute="none")
    assert plain.optimizer == pytest.approx(per_gpu * 12, rel=1e-6)
    act = activation_bytes(M, tokens=32768, tiles=64, tp=2, cp=4, sp=True)
    assert m.activations == act.saved - act.logits + act.transient
    assert m.logits == act.logits + act.logits_transient
    # SP gather buffer + the K/V ring (4 blocks) + the exchanged image features of 16 tiles
    s = 32768 / 4
    assert m.buffers == 2 * s * H * 2 + 4 * 2 * KV / 2 * s * 2 + 2 * 16 * 256 * H * 2


def test_pipeline_first_stage_holds_pp_microbatches():
    one = memory_breakdown(M, Layout(pp=1, spec="te"), seq_length=8192, micro_batch_size=1, tiles=8,
                           microbatches=8, recompute="none")
    four = memory_breakdown(M, Layout(pp=4, spec="te"), seq_length=8192, micro_batch_size=1, tiles=8,
                            microbatches=8, recompute="none")
    a = activation_bytes(M, tokens=8192, tiles=8, layers=6, last_stage=False)
    assert four.activations == pytest.approx(4 * a.saved + a.transient)   # 4 in flight on stage 0
    assert four.activations < one.activations * 4


def test_step_time_is_flops_over_efficient_peak_without_parallelism():
    cl = Cluster(gpus=1, gpu_mem_gib=80)
    sec, mfu, parts = step_time(M, Layout(spec="te"), cl, seq_length=8192, micro_batch_size=1, global_batch_size=2,
                                tiles_per_pack=16, sub_sample=8192, recompute="none")
    fl = step_flops(M, [8192] * 2, 32)
    assert sec == pytest.approx(fl.hardware / (989e12 * 0.5))
    assert mfu == pytest.approx(0.5)
    assert parts["tp_comm"] == parts["cp_comm"] == parts["dp_comm"] == parts["bubble"] == 0
    full, mfu_full, _ = step_time(M, Layout(spec="te"), cl, seq_length=8192, micro_batch_size=1, global_batch_size=2,
                                  tiles_per_pack=16, sub_sample=8192, recompute="full")
    assert full > sec and mfu_full < mfu


def test_data_parallel_communication_counts_what_overlap_leaves_exposed():
    """dp=8 in one node (450 GB/s), distributed optimizer, 2 micro-batches of 8K tokens per rank."""
    import dataclasses

    pc = param_counts(M)
    P = pc["vision"] + pc["projector"] + pc["embedding"] + L * pc["layer"] + pc["final_norm"] + pc["output"]
    ring = 7 / 8

    def dp_comm(layout, cluster=Cluster(gpus=8, gpu_mem_gib=80)):
        _, _, parts = step_time(M, layout, cluster, seq_length=8192, micro_batch_size=1, global_batch_size=16,
                                tiles_per_pack=16, sub_sample=8192, recompute="none")
        fl = step_flops(M, [8192] * 16, 16 * 16)
        per_mb = parts["compute"] / (16 // layout.dp)     # micro-batches per rank
        return parts["dp_comm"], per_mb * fl.forward / fl.hardware, per_mb * (1 - fl.forward / fl.hardware)

    on = Layout(dp=8, spec="te", distributed_optimizer=True)
    off = dataclasses.replace(on, overlap_grad_reduce=False)
    # not overlapped: the fp32 reduce-scatter and the bf16 all-gather of every parameter
    assert dp_comm(off)[0] == pytest.approx(P * (4 + 2) * ring / 450e9)
    # overlapped: the backward (the forward) hides all but the bucket holding the token embedding,
    # which is reduced last and gathered first
    edge = V * H
    exposed, fwd, bwd = dp_comm(on)
    assert P * 4 * ring / 450e9 < bwd and P * 2 * ring / 450e9 < fwd
    assert exposed == pytest.approx(edge * (4 + 2) * ring / 450e9)
    # parameters gathered in the optimizer step (parallel.overlap_param_gather=false): all of it counts
    no_gather = dataclasses.replace(on, overlap_param_gather=False)
    assert dp_comm(no_gather)[0] == pytest.approx(edge * 4 * ring / 450e9 + P * 2 * ring / 450e9)
    # a network too slow to hide behind one micro-batch: everything past the backward (forward) shows
    slow = Cluster(gpus=8, gpu_mem_gib=80, intra_node_gbps=0.5)
    exposed, fwd, bwd = dp_comm(on, slow)
    assert exposed == pytest.approx(P * 4 * ring / 0.5e9 - bwd + P * 2 * ring / 0.5e9 - fwd)
    assert exposed < dp_comm(off, slow)[0]
    # pipeline: the last stage reduces (gathers) in one piece after its last backward, while the first
    # stage still runs one more micro-batch
    pp2 = Layout(pp=2, dp=4, spec="te", distributed_optimizer=True)
    exposed, fwd, bwd = dp_comm(pp2, slow)
    first = pc["vision"] + pc["projector"] + pc["embedding"] + L / 2 * pc["layer"]
    last = L / 2 * pc["layer"] + pc["output"] + pc["final_norm"]
    ring = 3 / 4
    assert exposed == pytest.approx(max(first * 4 * ring / 0.5e9 - bwd, last * 4 * ring / 0.5e9 - bwd)
                                    + max(first * 2 * ring / 0.5e9 - fwd, last * 2 * ring / 0.5e9 - fwd))


def test_plan_1m_on_64_gpus_recommends_a_fitting_valid_layout():
    p = plan("internvl2-2b", 1 << 20, 64, 80)
    r = p.recommended
    assert r is not None and r is p.candidates[0]
    assert r.memory.total <= 0.9 * 80 * GIB
    assert r.tp * r.pp * r.cp * r.dp == 64
    assert min(c.step_seconds for c in p.candidates) == r.step_seconds
    for c in p.candidates:
        lay = Layout(tp=c.tp, pp=c.pp, cp=c.cp, dp=c.dp, sp=c.sequence_parallel, spec="te",
                     cp_comm_type=c.cp_comm_type, virtual_pp=c.vpp, distributed_optimizer=c.distributed_optimizer)
        # the plan is for bf16 (plan()'s default dtype): TE has no fp32 attention with CP
        assert not lay.problems(model=dataclasses.replace(M, dtype="bf16"), seq_length=1 << 20,
                                micro_batch_size=c.micro_batch_size, global_batch_size=32)
        assert c.fits and c.memory.total <= 0.9 * 80 * GIB
    rec = recipe_dict(p)
    assert rec["parallel"]["cp"] == r.cp and rec["launcher"]["nnodes"] * rec["launcher"]["nproc_per_node"] == 64


def test_plan_1m_on_one_gpu_says_nothing_fits_and_what_would():
    p = plan("internvl2-2b", 1 << 20, 1, 80)
    assert not p.candidates and p.recommended is None
    assert p.smallest_over is not None and p.smallest_over.memory.total > 0.9 * 80 * GIB
    text = "\n".join(p.advice)
    assert "GiB per GPU" in text and "GPUs of 80 GiB would fit" in text and "-token pack fits" in text
    # the GPU count it names really fits
    assert "--loss-chunk-tokens" in text                          # the logits are most of it
    g = int(next(a for a in p.advice if "would fit it" in a).split()[0])
    assert plan("internvl2-2b", 1 << 20, g, 80).recommended is not None
    assert plan("internvl2-2b", 1 << 20, g // 2, 80).recommended is None


def test_bad_arguments_are_named():
    with pytest.raises(RecipeError, match="--gpus 0"):
        plan("internvl2-2b", 4096, 0, 80)
    with pytest.raises(RecipeError, match="unknown; choose one of"):
        plan("internvl9-1t", 4096, 8, 80)
    with pytest.raises(ValueError, match="recompute"):
        activation_bytes(M, tokens=1, tiles=0, recompute="some")


def test_tiles_follow_the_image_share():
    assert plan("internvl2-2b", 32768, 32, 80, image_share=0.5).tiles_per_pack == 64
    assert plan("internvl2-2b", 32768, 32, 80, image_share=0.0).tiles_per_pack == 0
    assert math.isclose(plan("internvl2-2b", 32768, 32, 80, image_share=1.0).tiles_per_pack, 128)
