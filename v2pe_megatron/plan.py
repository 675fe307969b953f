"""Will a layout fit, and how fast will it run? The memory and step-time model behind ``v2pe-plan``.

Torch-free on purpose (like ``flops.py``, which it uses for every FLOP it counts): a plan is made on
a login node before a job is queued. Layout validity is ``parallel.layout.Layout.problems``; model
shapes are the recipe presets (``config.PRESETS``). The model is written down, with every constant and
its source, in ``docs/planning.md``; the activation terms are checked against the tensors the model
really saves for backward (``tests/test_plan_measured.py``, ``benchmarks/plan_memory.py``).

Activations are counted per token of the rank's local sequence (``tokens / cp``) and per layer, in
elements of the compute dtype unless stated as fp32, for two attention implementations:

- ``te``: Transformer Engine layers (``model.spec=te``, what production GPUs run): fused
  layernorm-linear (saves the norm's input and output), flash attention (q, k, the fused qkv buffer
  that v is a view of, out, and the fp32 log-sum-exp; no [s, s] term), megatron's SwiGLU MLP.
- ``local``: the local spec (``model.spec=local``: CI on the CPU, and GPUs without Transformer
  Engine): torch norms (input, fp32 rstd and normalised output saved), SDPA per packed sub-sample at
  CP=1 (torch's flash kernels on CPU and CUDA: no [s, s] term; grouped K/V repeated to all heads
  first), our fp32 ring attention at CP>1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from v2pe_megatron.flops import PEAK_BF16_FLOPS, step_flops
from v2pe_megatron.parallel.layout import Layout

__all__ = ["DTYPE_BYTES", "GIB", "Cluster", "Activations", "MemoryBreakdown", "Candidate", "Plan", "param_counts",
           "parameter_count", "checkpoint_bytes",
           "activation_bytes", "in_flight_microbatches", "memory_breakdown", "step_time", "plan", "model_config",
           "recipe_dict", "format_plan"]

GIB = 1024 ** 3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
RECOMPUTE = ("none", "selective", "full")


# ---------------------------------------------------------------------------------------------
# The machine (stated, overridable): what the step-time model divides by
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpu_mem_gib: float
    gpus_per_node: int = 8
    # Peak dense bf16 FLOP/s of one GPU (flops.PEAK_BF16_FLOPS, H100 SXM by default).
    peak_flops: float = dict(PEAK_BF16_FLOPS)["H100"]
    # Fraction of peak that large bf16 matmuls and flash attention sustain in a real step. NeMo's
    # published 1M-token Llama2-7B run reached 536 TFLOP/s per H100 (54% of 989): 0.5 is that, rounded down.
    efficiency: float = 0.5
    # Per GPU, one direction: NVLink 4 (H100 SXM, 900 GB/s both ways) and one 400 Gb/s NDR NIC per GPU.
    intra_node_gbps: float = 450.0
    inter_node_gbps: float = 50.0
    # Not in torch's allocator: CUDA context, NCCL communicators and their workspaces, cuBLAS workspace.
    runtime_reserved_gib: float = 2.5
    # Headroom for allocator fragmentation: a layout fits when its total <= (1 - this) x gpu_mem_gib.
    fragmentation: float = 0.10

    @property
    def usable_gib(self) -> float:
        return self.gpu_mem_gib * (1.0 - self.fragmentation)


def model_config(preset: str) -> Any:
    """The ``ModelConfig`` of a preset (``config.PRESETS``), as a recipe with that preset gets it."""
    from v2pe_megatron.config import PRESETS, RecipeError, load_recipe

    if preset not in PRESETS:
        raise RecipeError(f"--model {preset!r} is unknown; choose one of {sorted(PRESETS)}")
    return load_recipe(None, [f"model.preset={preset}"]).model


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------
def param_counts(model_cfg: Any) -> dict[str, int]:
    """Parameters by part: ``vision`` (InternViT), ``projector``, ``embedding``, ``layer`` (one LLM
    layer), ``final_norm``, ``output`` (0 when tied); :func:`parameter_count` sums them."""
    v, lm, r = model_cfg.vision, model_cfg.language, model_cfg.projector.downsample_ratio
    c, f = v.hidden_size, v.ffn_hidden_size
    side = v.image_size // v.patch_size
    vit = (c * v.num_channels * v.patch_size ** 2 + c) + c + (side * side + 1) * c
    vit_layer = (2 * c + 3 * c * c + (3 * c if v.qkv_bias else 0) + c * c + c + 2 * c + f * c + f + c * f + c
                 + 2 * c)
    vit += v.num_layers * vit_layer
    inner = int(round(c / r ** 2))
    h = lm.hidden_size
    d = h // lm.num_attention_heads
    qkv = (lm.num_attention_heads + 2 * lm.num_query_groups) * d
    layer = 2 * h + h * qkv + (qkv if lm.qkv_bias else 0) + lm.num_attention_heads * d * h + 3 * h * lm.ffn_hidden_size
    return {"vision": vit, "projector": 2 * inner + inner * h + h + h * h + h, "embedding": lm.vocab_size * h,
            "layer": layer, "final_norm": h, "output": 0 if lm.tie_word_embeddings else lm.vocab_size * h}


def parameter_count(model_cfg: Any) -> int:
    """The whole model's parameters (unpadded vocab, as the HF checkpoints count them)."""
    pc = param_counts(model_cfg)
    return int(pc["vision"] + pc["projector"] + pc["embedding"] + model_cfg.language.num_layers * pc["layer"]
               + pc["final_norm"] + pc["output"])


def checkpoint_bytes(model_cfg: Any, *, optimizer: str = "adam", distributed_optimizer: bool = False) -> int:
    """About the size of one training checkpoint (``training/checkpointing.py``): the weights in
    ``model_cfg.dtype``; the fp32 main weights, written by the distributed optimizer in any dtype and
    by megatron's other optimizers for bf16/fp16 weights; Adam's two fp32 moments. Measured on the
    tiny model: 12 bytes per parameter (fp32, Adam), 16 with the distributed optimizer."""
    b = DTYPE_BYTES[model_cfg.dtype]
    main = 4 if (b != 4 or distributed_optimizer) else 0
    moments = 8 if optimizer == "adam" else 0
    return parameter_count(model_cfg) * (b + main + moments)


# ---------------------------------------------------------------------------------------------
# Activations: what one micro-batch leaves saved for backward on one rank
# ---------------------------------------------------------------------------------------------
@dataclass
class Activations:
    """Bytes one micro-batch keeps for backward on one rank (``saved``: what autograd's saved-tensor
    hooks see, deduplicated by storage), by part, plus the short-lived peak on top of it."""

    vision: float = 0.0          # InternViT: pixels, all layers
    projector: float = 0.0
    llm_layers: float = 0.0      # the rank's LLM layers
    llm_other: float = 0.0       # token ids, image merge, final norm, output-layer input, loss mask
    logits: float = 0.0          # the fp32 logits the vocab-parallel cross entropy saves
    # the micro-batch's rotary cos/sin when autograd does not save them (recompute re-reads them): held
    # until its backward all the same
    rotary_held: float = 0.0
    transient: float = 0.0       # peak on top of the saved tensors: a layer re-run by recompute
    logits_transient: float = 0.0  # and the logits being computed (dtype copy, or one loss chunk)

    @property
    def saved(self) -> float:
        return self.vision + self.projector + self.llm_layers + self.llm_other + self.logits


def _llm_layer_elems(lm: Any, *, tp: int, sp: bool, cp: int, recompute: str, path: str) -> tuple[float, float]:
    """(compute-dtype elements, fp32 elements) one LLM layer saves per local token."""
    h, nh, ng = lm.hidden_size, lm.num_attention_heads, lm.num_query_groups
    d, f = h // nh, lm.ffn_hidden_size
    kv = ng * d
    rep = tp if sp else 1                       # what sequence parallelism divides the unsharded parts by
    if recompute == "full":                    # only the layer's input stays (megatron checkpoint)
        return h / rep, 0.0
    mlp = 5 * f                                 # fc1 out (2f), silu out, the linear half (+offset), fc2 input
    if path == "te":
        # TE layernorm-linear: norm input + norm output, twice; fp32 rsigma twice.
        repl, repl32 = 4 * h, 2.0
        attn = h + kv + (h + 2 * kv) + h        # q (rotary), k (rotary), qkv buffer (v is a view), out
        attn32 = nh if recompute == "none" else 0.0   # flash log-sum-exp (not kept: attention recomputed)
        return repl / rep + (attn + mlp) / tp, repl32 / rep + attn32 / tp
    # local spec: torch norm (input, normalised) + the linear's input (norm output), twice; fp32 rstd twice.
    repl, repl32 = 6 * h, 2.0
    if recompute == "selective":                # checkpointed core attention: its inputs only
        attn, attn32 = h + kv + (h + 2 * kv) + h, 0.0      # q, k, qkv buffer, out (linear_proj's input)
    elif cp > 1:                                # ring attention: fp32 q, stacked k/v, out and lse
        attn, attn32 = h, 2 * h + 2 * kv + nh             # + out in the compute dtype (linear_proj's input)
    elif nh != ng:                              # SDPA with grouped K/V repeated to all heads
        attn, attn32 = 5 * h, nh                           # q, k, v (repeated), out, linear_proj's input
    else:
        attn, attn32 = h + h + 3 * h + 2 * h, nh          # q, k, qkv buffer (v), out, linear_proj's input
    return repl / rep + (attn + mlp) / tp, repl32 / rep + attn32 / tp


def _vit_layer_elems(vit: Any, *, tp: int, recompute: str) -> tuple[float, float]:
    """(dtype elements, fp32 elements) one InternViT layer saves per patch token (never SP or CP)."""
    c, f, nh = vit.hidden_size, vit.ffn_hidden_size, vit.num_attention_heads
    if recompute == "full":
        return float(c), 0.0
    # norm input + output twice, layer scale x2 (it multiplies a learned scale); qkv buffer, out; GELU in/out.
    return 6 * c + (4 * c + 2 * f) / tp, 4.0 + (nh / tp if recompute == "none" else 0.0)


def activation_bytes(model_cfg: Any, *, tokens: int, tiles: int, dtype: str = "bf16", tp: int = 1, cp: int = 1,
                     sp: bool = False, recompute: str = "none", path: str = "te", layers: Optional[int] = None,
                     first_stage: bool = True, last_stage: bool = True, loss_chunk_tokens: int = 0,
                     pixel_tiles: Optional[int] = None) -> Activations:
    """What one micro-batch of ``tokens`` LLM tokens (all rows) and ``tiles`` image tiles leaves
    saved for backward on one rank of a ``tp`` x ``cp`` layout holding ``layers`` LLM layers (all by
    default), the vision tower and embedding when ``first_stage``, the logits when ``last_stage``.

    ``pixel_tiles``: the tiles whose pixels the rank holds (the patch embedding keeps its input, a view
    of them); default its share, ``ceil(tiles / cp)``, as with CP-sharded images. A rank that
    receives the whole pack's pixels holds ``tiles``.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r} is not one of {', '.join(RECOMPUTE)}")
    if path not in ("te", "local"):
        raise ValueError(f"path={path!r} is not te or local")
    b = DTYPE_BYTES[dtype]
    lm, vit, r = model_cfg.language, model_cfg.vision, model_cfg.projector.downsample_ratio
    h, d, v = lm.hidden_size, lm.hidden_size // lm.num_attention_heads, lm.vocab_size
    layers = lm.num_layers if layers is None else layers
    s = tokens / cp                             # the rank's share of the sequence
    rep = tp if sp else 1
    a = Activations()

    e, e32 = _llm_layer_elems(lm, tp=tp, sp=sp, cp=cp, recompute=recompute, path=path)
    a.llm_layers = layers * s * (e * b + e32 * 4)
    if layers:
        # Rotary cos and sin, computed once per micro-batch and shared by every layer (not per layer:
        # model.attention.V2PERotary), replicated over tp; autograd saves them only without recompute.
        if recompute == "none":
            a.llm_other += 2 * s * d * b
        else:
            a.rotary_held = 2 * s * d * b
    if recompute == "full" and layers:
        ne, ne32 = _llm_layer_elems(lm, tp=tp, sp=sp, cp=cp, recompute="none", path=path)
        a.transient += s * (ne * b + ne32 * 4)  # one layer re-run in backward
    if first_stage:
        a.llm_other += s * 8 + (s * 1 if tiles else 0)   # int64 ids (embedding), bool image mask (merge)
        if tp > 1:                              # the vocab-parallel embedding's bool out-of-shard mask
            a.llm_other += s * 1
        if sp:                                  # the SP scatter slices the merged embeddings without a copy:
            a.llm_other += s * h * (1 - 1 / tp) * b     # the first layer's view keeps all of them alive
        local_tiles = math.ceil(tiles / cp)     # CP: each rank encodes an equal share (vision_cp)
        side = vit.image_size // vit.patch_size
        if cp > 1 and tiles:                    # int64 index of the features this rank's tokens take
            a.llm_other += 8 * tiles * model_cfg.num_image_token / cp
        n = side * side + 1                     # patches + CLS
        ve, ve32 = _vit_layer_elems(vit, tp=tp, recompute=recompute)
        held = local_tiles if pixel_tiles is None else pixel_tiles
        a.vision = (held * vit.num_channels * vit.image_size ** 2 * b
                    + local_tiles * vit.num_layers * n * (ve * b + ve32 * 4))
        if recompute == "full" and local_tiles:
            ne, ne32 = _vit_layer_elems(vit, tp=tp, recompute="none")
            a.transient = max(a.transient, local_tiles * n * (ne * b + ne32 * 4))
        inner, out = int(round(vit.hidden_size / r ** 2)), int(round(side * side * r * r))
        # layer norm input + output (linear_1's input), fp32 mean/rstd, GELU input, linear_2 input
        a.projector = local_tiles * out * ((2 * inner + 2 * h / tp) * b + 2 * 4)
    if last_stage:
        # final norm (input, normalised, fp32 rstd), output layer input, fp32 loss mask
        a.llm_other += s * ((2 * h / rep + h / rep) * b + 4 / rep + 4)
        if loss_chunk_tokens and loss_chunk_tokens > 0:
            # Chunked loss: one chunk's logits at a time, recomputed in backward (bf16 logits, fp32
            # softmax, fp32 gradient of the chunk).
            a.logits_transient = min(loss_chunk_tokens, s) * v / tp * (b + 8)
        else:
            # vocab-parallel cross entropy: fp32 softmax [s, V/tp], bool target mask, int64 targets
            a.logits = s * (v / tp * 4 + 1 + 8)
            if b != 4:                          # the dtype logits live next to their fp32 copy
                a.logits_transient = s * v / tp * b
    return a


# ---------------------------------------------------------------------------------------------
# A layout's memory per GPU
# ---------------------------------------------------------------------------------------------
@dataclass
class MemoryBreakdown:
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    buffers: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.logits + self.buffers

    def gib(self) -> dict[str, float]:
        out = {k: round(getattr(self, k) / GIB, 2) for k in ("parameters", "gradients", "optimizer",
                                                               "activations", "logits", "buffers")}
        out["total"] = round(self.total / GIB, 2)
        return out


def _stage_params(model_cfg: Any, *, tp: int, pp: int) -> tuple[float, float]:
    """(first stage, last stage) parameters per GPU: the vision tower, projector and embedding live on
    the first stage, the output layer and final norm (replicated over tp) on the last."""
    pc = param_counts(model_cfg)
    layers = model_cfg.language.num_layers / pp * pc["layer"]
    head = pc["vision"] + pc["projector"] + pc["embedding"]
    if pp == 1:
        whole = (head + layers + pc["output"]) / tp + pc["final_norm"]
        return whole, whole
    return (head + layers) / tp, (layers + pc["output"]) / tp + pc["final_norm"]


def in_flight_microbatches(pp: int, vpp: int, microbatches: int) -> float:
    """Micro-batches whose activations the first pipeline stage holds at once (1F1B: pp; interleaved:
    megatron's (1 + (pp-1)/(pp*vpp)) x pp layer-sets of a 1/vpp chunk each, Korthikanti et al. 2022)."""
    if pp == 1:
        return 1.0
    m = min(pp, microbatches)
    return m * (1 + (pp - 1) / (pp * vpp)) if vpp > 1 else float(m)


def memory_breakdown(model_cfg: Any, layout: Layout, *, seq_length: int, micro_batch_size: int, tiles: int,
                     microbatches: int, recompute: str, dtype: str = "bf16", path: str = "te",
                     loss_chunk_tokens: int = 0, runtime_reserved_gib: float = 0.0) -> MemoryBreakdown:
    """Per-GPU memory of the busiest pipeline stage (first or last)."""
    tp, pp, cp, vpp = layout.tp, layout.pp, layout.cp, layout.virtual_pp
    dp = max(layout.dp, 1)
    b = DTYPE_BYTES[dtype]
    lm = model_cfg.language
    h, ng, d = lm.hidden_size, lm.num_query_groups, lm.hidden_size // lm.num_attention_heads
    tokens = seq_length * micro_batch_size
    s = tokens / cp
    master = 4 if b != 4 else 0                 # fp32 master weights when training in bf16/fp16
    grads_b = 4                                 # DDP: grad_reduce_in_fp32 (training.engine)
    shard = dp * cp if layout.distributed_optimizer else 1   # megatron shards over data x context parallel

    best: Optional[MemoryBreakdown] = None
    stages = [(True, pp == 1)] + ([(False, True)] if pp > 1 else [])
    first_p, last_p = _stage_params(model_cfg, tp=tp, pp=pp)
    for first, last in stages:
        params = first_p if first else last_p
        act = activation_bytes(model_cfg, tokens=tokens, tiles=tiles, dtype=dtype, tp=tp, cp=cp, sp=layout.sp,
                               recompute=recompute, path=path, layers=lm.num_layers // pp, first_stage=first,
                               last_stage=last, loss_chunk_tokens=loss_chunk_tokens)
        held = in_flight_microbatches(pp, vpp, microbatches) if first else 1.0
        activations = (act.vision + act.projector + act.llm_layers + act.llm_other + act.rotary_held) * held \
            + act.transient
        buffers = runtime_reserved_gib * GIB
        if layout.sp:                            # megatron's global buffer for the all-gathered layer input
            buffers += 2 * s * h * b
        if cp > 1:                               # ring: K/V block being sent + received; dK/dV in backward
            buffers += 4 * 2 * ng * d / tp * s * b
            if first and tiles:                  # image features exchanged between CP ranks
                buffers += 2 * math.ceil(tiles / cp) * model_cfg.num_image_token * h * b
        if pp > 1:                               # stage-boundary send and receive
            buffers += 2 * 2 * s / (tp if layout.sp else 1) * h * b
        m = MemoryBreakdown(parameters=params * b, gradients=params * grads_b,
                            optimizer=params * (master + 8) / shard, activations=activations,
                            logits=act.logits + act.logits_transient, buffers=buffers)
        if best is None or m.total > best.total:
            best = m
    assert best is not None
    return best


# ---------------------------------------------------------------------------------------------
# Step time
# ---------------------------------------------------------------------------------------------
def step_time(model_cfg: Any, layout: Layout, cluster: Cluster, *, seq_length: int, micro_batch_size: int,
              global_batch_size: int, tiles_per_pack: int, sub_sample: int, recompute: str,
              dtype: str = "bf16") -> tuple[float, float, dict[str, float]]:
    """(seconds per step, MFU, parts): compute at ``cluster.efficiency`` x peak, the pipeline bubble,
    and the communication that is not overlapped (docs/planning.md states each term)."""
    b = DTYPE_BYTES[dtype]
    lm = model_cfg.language
    h, ng, d, layers = lm.hidden_size, lm.num_query_groups, lm.hidden_size // lm.num_attention_heads, lm.num_layers
    tp, pp, cp, vpp, dp = layout.tp, layout.pp, layout.cp, layout.virtual_pp, max(layout.dp, 1)
    n_sub, tail = divmod(seq_length, sub_sample)
    lens = [sub_sample] * n_sub + ([tail] if tail else [])
    packs = global_batch_size
    fl = step_flops(model_cfg, lens * packs, tiles_per_pack * packs, recompute=recompute)
    gpus = layout.world_size
    # Pipeline stages run at the pace of the busiest one: the vision tower and projector sit on the first
    # stage, the logits on the last, the LLM layers are split evenly.
    vision = sum(fl.parts[k] for k in ("vit_embed", "vit_dense", "vit_attention", "projector")) / fl.forward
    logits = fl.parts["logits"] / fl.forward
    llm = 1.0 - vision - logits
    busiest = max(vision + llm / pp + (logits if pp == 1 else 0.0), llm / pp + logits)
    compute = fl.hardware * busiest / (gpus / pp) / (cluster.peak_flops * cluster.efficiency)
    microbatches = global_batch_size // (micro_batch_size * dp)
    bubble = compute * (pp - 1) / (vpp * microbatches) if pp > 1 else 0.0

    def bw(group_span: int) -> float:           # bytes/s of a group spanning this many consecutive ranks
        return (cluster.intra_node_gbps if group_span <= cluster.gpus_per_node else cluster.inter_node_gbps) * 1e9

    s = seq_length * micro_batch_size / cp      # local tokens per micro-batch
    per_mb = microbatches
    # TP with SP: all-gather + reduce-scatter of [s, h] twice per layer forward, twice backward
    # (+ once more forward with full recompute); ring algorithms move (tp-1)/tp of the tensor. Not overlapped.
    tp_comm = 0.0
    if tp > 1:
        passes = 4 + (2 if recompute == "full" else 0)
        tp_comm = per_mb * (layers / pp) * passes * 2 * s * h * b * (tp - 1) / tp / bw(tp)
    # CP ring: cp-1 K/V blocks per layer forward, K/V + dK/dV backward, overlapped with the attention
    # core of the same step: only what the attention compute does not hide counts.
    cp_comm = 0.0
    if cp > 1 and layout.cp_comm_type == "a2a":
        # all-to-all of q, k, v before and of out after each attention core, (cp-1)/cp of each moves;
        # backward moves it twice; not overlapped.
        volume = (2 * h + 2 * ng * d) / tp * s * b * (cp - 1) / cp
        cp_comm = per_mb * (layers / pp) * volume * (1 + 2 + (1 if recompute == "full" else 0)) / bw(tp * cp)
    elif cp > 1:
        kv_block = 2 * ng * d / tp * s * b
        ring = per_mb * (layers / pp) * (cp - 1) * kv_block * (1 + 2 + (1 if recompute == "full" else 0)) / bw(tp * cp)
        attn_time = (fl.parts["llm_attention"] * (3 + (1 if recompute != "none" else 0))) / gpus / (
            cluster.peak_flops * cluster.efficiency)
        cp_comm = max(0.0, ring - attn_time)
    # Data parallel (with the CP ranks): fp32 gradients reduce-scattered (all-reduced, twice the traffic,
    # without the distributed optimizer), bf16 parameters all-gathered back with it; only what the
    # compute does not hide counts (docs/planning.md, "Data-parallel communication").
    dp_comm = 0.0
    dpcp = dp * cp
    if dpcp > 1:
        dp_comm = _exposed_dp_comm(model_cfg, layout, bw(gpus // pp), b=b, microbatch=compute / microbatches,
                                   forward_share=fl.forward / fl.hardware)
    seconds = compute + bubble + tp_comm + cp_comm + dp_comm
    mfu = fl.model / (seconds * gpus * cluster.peak_flops)
    return seconds, mfu, {"compute": compute, "bubble": bubble, "tp_comm": tp_comm, "cp_comm": cp_comm,
                          "dp_comm": dp_comm}


def _exposed_dp_comm(model_cfg: Any, layout: Layout, bandwidth: float, *, b: int, microbatch: float,
                     forward_share: float) -> float:
    """Seconds of data-parallel communication a step waits for, on the stage that waits longest.

    ``microbatch``: seconds of one micro-batch's forward + backward on the busiest stage, of which
    ``forward_share`` is the forward. Without overlap the reduction and the all-gather follow the
    backward. With it (training.engine.wrap_ddp, megatron's buckets of max(40M, 1M x dp) parameters):
    the first stage reduces bucket by bucket during its last backward, and the bucket it completes last
    (the one holding the token embedding, the first parameters the forward reads) is reduced after it;
    the other stages reduce in one piece after their last backward while the stages before them still
    run theirs (one micro-batch's backward per stage in between). The all-gather of the updated
    parameters (distributed optimizer) runs during the next step's first forward the same way, the
    first bucket before it."""
    tp, pp, cp, dp = layout.tp, layout.pp, layout.cp, max(layout.dp, 1)
    ring = (dp * cp - 1) / (dp * cp)
    pc = param_counts(model_cfg)
    first_p, last_p = _stage_params(model_cfg, tp=tp, pp=pp)
    middle_p = model_cfg.language.num_layers / pp * pc["layer"] / tp
    reduce_bytes = 4 if layout.distributed_optimizer else 8      # fp32 reduce-scatter, or all-reduce
    gather_bytes = b if layout.distributed_optimizer else 0

    def seconds(params: float, nbytes: int) -> float:
        return params * nbytes * ring / bandwidth

    if not layout.overlap_grad_reduce:
        return seconds(first_p, reduce_bytes + gather_bytes)
    forward, backward = microbatch * forward_share, microbatch * (1 - forward_share)
    edge = min(first_p, max(40e6, 1e6 * dp, pc["embedding"] / tp))

    def exposed(nbytes: int, hide: float) -> float:
        out = max(seconds(edge, nbytes), seconds(first_p, nbytes) - hide)
        for stage, params in ((1, middle_p), (pp - 1, last_p)) if pp > 1 else ():
            out = max(out, seconds(params, nbytes) - stage * hide)
        return out

    grads = exposed(reduce_bytes, backward)
    if layout.param_gather_overlapped:
        return grads + exposed(gather_bytes, forward)
    return grads + seconds(first_p, gather_bytes)


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    tp: int
    pp: int
    vpp: int
    cp: int
    dp: int
    micro_batch_size: int
    recompute: str
    cp_comm_type: str
    sequence_parallel: bool
    distributed_optimizer: bool
    memory: MemoryBreakdown
    step_seconds: float
    mfu: float
    fits: bool
    recommended: bool = False
    parts: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"tp": self.tp, "pp": self.pp, "vpp": self.vpp, "cp": self.cp, "dp": self.dp,
                "micro_batch_size": self.micro_batch_size, "recompute": self.recompute,
                "cp_comm_type": self.cp_comm_type, "sequence_parallel": self.sequence_parallel,
                "distributed_optimizer": self.distributed_optimizer, "memory_gib": self.memory.gib(),
                "step_seconds": round(self.step_seconds, 3), "mfu": round(self.mfu, 4),
                "recommended": self.recommended, "step_parts": {k: round(v, 4) for k, v in self.parts.items()}}

    def parallel_overrides(self) -> dict[str, Any]:
        """The recipe keys this layout sets."""
        return {"parallel.tp": self.tp, "parallel.pp": self.pp, "parallel.virtual_pp": self.vpp,
                "parallel.cp": self.cp, "parallel.sequence_parallel": self.sequence_parallel,
                "parallel.use_distributed_optimizer": self.distributed_optimizer,
                "parallel.cp_comm_type": self.cp_comm_type, "data.micro_batch_size": self.micro_batch_size,
                "train.recompute": self.recompute}


@dataclass
class Plan:
    preset: str
    seq_length: int
    cluster: Cluster
    global_batch_size: int
    tiles_per_pack: int
    candidates: list[Candidate]           # layouts that fit, fastest first
    considered: int                       # layouts checked (valid for the model and the cluster)
    smallest_over: Optional[Candidate]    # the lightest layout that does not fit (why nothing fits)
    advice: list[str]                     # what would fit, when nothing does
    path: str = "te"                      # the layer implementation the activations are counted for

    @property
    def recommended(self) -> Optional[Candidate]:
        return next((c for c in self.candidates if c.recommended), None)


def _pow2_upto(n: int) -> list[int]:
    out, k = [], 1
    while k <= n:
        out.append(k)
        k *= 2
    return out


def _search(model_cfg: Any, seq_length: int, cluster: Cluster, *, global_batch_size: int, image_share: float,
            sub_sample: int, dtype: str, loss_chunk_tokens: int, path: str = "te") -> tuple[list[Candidate], int]:
    lm = model_cfg.language
    tiles = int(seq_length * image_share // model_cfg.num_image_token)
    out: list[Candidate] = []
    considered = 0
    for tp in _pow2_upto(min(cluster.gpus_per_node, cluster.gpus)):
        for pp in [p for p in (1, 2, 4, 8) if p <= cluster.gpus]:
            for vpp in ([1] if pp == 1 else [1, 2]):
                for cp in _pow2_upto(cluster.gpus // (tp * pp)):
                    if cluster.gpus % (tp * pp * cp):
                        continue
                    dp = cluster.gpus // (tp * pp * cp)
                    for mbs in (1, 2):
                        for comm in ("p2p", "a2a") if cp > 1 else ("p2p",):
                            layout = Layout(tp=tp, pp=pp, cp=cp, dp=dp, sp=tp > 1, spec=path, cp_comm_type=comm,
                                            distributed_optimizer=dp * cp > 1, virtual_pp=vpp)
                            if layout.problems(model=model_cfg, seq_length=seq_length, micro_batch_size=mbs,
                                               global_batch_size=global_batch_size):
                                continue
                            if mbs * seq_length > max(seq_length, 8192):   # long packs: one per micro-batch
                                continue
                            microbatches = global_batch_size // (mbs * dp)
                            for rec in RECOMPUTE:
                                considered += 1
                                mem = memory_breakdown(model_cfg, layout, seq_length=seq_length, micro_batch_size=mbs,
                                                       tiles=tiles * mbs, microbatches=microbatches, recompute=rec,
                                                       dtype=dtype, loss_chunk_tokens=loss_chunk_tokens, path=path,
                                                       runtime_reserved_gib=cluster.runtime_reserved_gib)
                                sec, mfu, parts = step_time(model_cfg, layout, cluster, seq_length=seq_length,
                                                            micro_batch_size=mbs, global_batch_size=global_batch_size,
                                                            tiles_per_pack=tiles, sub_sample=sub_sample,
                                                            recompute=rec, dtype=dtype)
                                out.append(Candidate(tp, pp, vpp, cp, dp, mbs, rec, comm, tp > 1, dp * cp > 1, mem,
                                                     sec, mfu, mem.total <= cluster.usable_gib * GIB, parts=parts))
    return out, considered


def plan(preset: str, seq_length: int, gpus: int, gpu_mem_gib: float, *, global_batch_size: int = 32,
         image_share: float = 0.5, sub_sample: Optional[int] = None, dtype: str = "bf16", loss_chunk_tokens: int = 0,
         cluster: Optional[Cluster] = None, path: str = "te") -> Plan:
    """The layouts of ``preset`` at ``seq_length`` tokens per pack that fit ``gpus`` GPUs of
    ``gpu_mem_gib`` GiB, fastest first, the fastest marked recommended; with advice when none fits.

    ``image_share``: the fraction of a pack's tokens that are image tokens (tiles = seq x share /
    tokens per tile); ``sub_sample``: the longest attention span (default: the whole pack is one
    sample, the worst case for attention); ``global_batch_size``: packs per step (V2PE: 32); ``path``:
    the layers' implementation, ``te`` (production GPUs) or ``local`` (see the module docstring).
    """
    from v2pe_megatron.config import RecipeError

    problems = []
    if seq_length < 1:
        problems.append(f"--seq {seq_length} must be >= 1")
    if gpus < 1:
        problems.append(f"--gpus {gpus} must be >= 1")
    if not (math.isfinite(gpu_mem_gib) and gpu_mem_gib > 0):  # nan compares false to everything
        problems.append(f"--gpu-mem {gpu_mem_gib} must be a finite number > 0 (GiB per GPU, e.g. 80)")
    if not (math.isfinite(image_share) and 0.0 <= image_share <= 1.0):
        problems.append(f"--image-share {image_share} must be in [0, 1]")
    if global_batch_size < 1:
        problems.append(f"--global-batch {global_batch_size} must be >= 1")
    if sub_sample is not None and sub_sample < 0:
        problems.append(f"--sub-sample {sub_sample} must be >= 0 (0: the whole pack is one sample)")
    if loss_chunk_tokens < 0:
        problems.append(f"--loss-chunk-tokens {loss_chunk_tokens} must be >= 0 (0: the whole sequence's logits "
                        f"at once)")
    if cluster is not None and cluster.gpus_per_node < 1:
        problems.append(f"--gpus-per-node {cluster.gpus_per_node} must be >= 1")
    if path not in ("te", "local"):
        problems.append(f"--spec {path!r} is not te or local")
    if dtype not in DTYPE_BYTES:
        problems.append(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    if problems:
        raise RecipeError("; ".join(problems))
    model_cfg = dataclasses.replace(model_config(preset), dtype=dtype)  # the layout rules read model.dtype
    cluster = cluster or Cluster(gpus=gpus, gpu_mem_gib=gpu_mem_gib)
    cluster = dataclasses.replace(cluster, gpus=gpus, gpu_mem_gib=gpu_mem_gib)
    sub = min(sub_sample or seq_length, seq_length)
    kwargs = dict(global_batch_size=global_batch_size, image_share=image_share, sub_sample=sub, dtype=dtype,
                  loss_chunk_tokens=loss_chunk_tokens, path=path)
    every, considered = _search(model_cfg, seq_length, cluster, **kwargs)
    fits = sorted((c for c in every if c.fits), key=lambda c: (round(c.step_seconds, 6), c.memory.total))
    if fits:
        fits[0].recommended = True
    over = min((c for c in every if not c.fits), key=lambda c: c.memory.total, default=None)
    tiles = int(seq_length * image_share // model_cfg.num_image_token)
    advice: list[str] = []
    if not fits:
        advice = _advice(preset, model_cfg, seq_length, cluster, over, considered, **kwargs)
    return Plan(preset, seq_length, cluster, global_batch_size, tiles, fits, considered, over, advice, path)


def _advice(preset: str, model_cfg: Any, seq_length: int, cluster: Cluster, over: Optional[Candidate],
            considered: int, **kwargs: Any) -> list[str]:
    """What would fit: more GPUs (the fewest that do, up to 4096), or the longest sequence that fits."""
    lines = []
    if considered == 0:
        lines.append(f"no valid layout of {preset} on {cluster.gpus} GPUs with a global batch of "
                     f"{kwargs['global_batch_size']} packs: use a GPU count that divides it (or --global-batch)")
    elif over is not None:
        m = over.memory
        lines.append(f"the lightest layout (tp={over.tp} pp={over.pp} cp={over.cp} dp={over.dp}, recompute="
                     f"{over.recompute}) needs {m.total / GIB:.1f} GiB per GPU (activations {m.activations / GIB:.1f}, "
                     f"logits {m.logits / GIB:.1f}, parameters+gradients+optimizer "
                     f"{(m.parameters + m.gradients + m.optimizer) / GIB:.1f}, buffers {m.buffers / GIB:.1f}) "
                     f"but {cluster.usable_gib:.1f} of "
                     f"{cluster.gpu_mem_gib:g} GiB are usable")
        if not kwargs.get("loss_chunk_tokens") and m.logits > 0.25 * m.total:
            lines.append(f"the logits alone take {m.logits / GIB:.1f} GiB: computing the loss in chunks "
                         f"(model.loss_chunk_tokens, --loss-chunk-tokens 2048) keeps one chunk's at a time")
    g = cluster.gpus
    while g < 4096:
        g *= 2
        more, _ = _search(model_cfg, seq_length, dataclasses.replace(cluster, gpus=g), **kwargs)
        best = min((c for c in more if c.fits), key=lambda c: c.step_seconds, default=None)
        if best is not None:
            lines.append(f"{g} GPUs of {cluster.gpu_mem_gib:g} GiB would fit it: tp={best.tp} pp={best.pp} "
                         f"cp={best.cp} dp={best.dp} recompute={best.recompute} "
                         f"({best.memory.total / GIB:.1f} GiB per GPU)")
            break
    else:
        lines.append(f"not even 4096 GPUs of {cluster.gpu_mem_gib:g} GiB fit a {seq_length}-token pack")
    seq = seq_length
    while seq > 1024:
        seq //= 2
        shorter, _ = _search(model_cfg, seq, cluster, **{**kwargs, "sub_sample": min(kwargs["sub_sample"], seq)})
        best = min((c for c in shorter if c.fits), key=lambda c: c.step_seconds, default=None)
        if best is not None:
            lines.append(f"on {cluster.gpus} GPUs a {seq}-token pack fits (tp={best.tp} pp={best.pp} cp={best.cp} "
                         f"recompute={best.recompute}, {best.memory.total / GIB:.1f} GiB per GPU)")
            break
    return lines


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def recipe_dict(p: Plan, candidate: Optional[Candidate] = None, *, name: str = "", dtype: str = "bf16",
                loss_chunk_tokens: int = 0) -> dict[str, Any]:
    """A recipe (nested dict, only what differs from the defaults) that runs ``candidate`` (default:
    the recommended layout) on the plan's cluster, with V2PE's fine-tuning settings."""
    c = candidate or p.recommended
    if c is None:
        raise ValueError("nothing fits: no layout to write a recipe for")
    per_node = min(p.cluster.gpus_per_node, p.cluster.gpus)
    rec: dict[str, Any] = {
        "name": name or f"{p.preset.replace('-', '_')}_{p.seq_length}",
        "model": {"preset": p.preset, "dtype": dtype, "spec": "auto"},
        "v2pe": {"policy": "random"},
        "parallel": {"tp": c.tp, "pp": c.pp, "virtual_pp": c.vpp, "cp": c.cp, "sequence_parallel": c.sequence_parallel,
                     "use_distributed_optimizer": c.distributed_optimizer, "cp_comm_type": c.cp_comm_type},
        "data": {"seq_length": p.seq_length, "micro_batch_size": c.micro_batch_size,
                 "global_batch_size": p.global_batch_size,
                 "max_tiles_per_pack": max(64, -(-p.seq_length // 256))},
        "optimizer": {"lr": 5.0e-6, "weight_decay": 0.05, "warmup_fraction": 0.03, "decay_style": "cosine"},
        "train": {"recompute": c.recompute},
        "launcher": {"nproc_per_node": per_node, "nnodes": p.cluster.gpus // per_node},
    }
    if loss_chunk_tokens:
        rec["model"]["loss_chunk_tokens"] = loss_chunk_tokens
    return rec


def format_plan(p: Plan, *, top: int = 10) -> str:
    """The plan as a table for people (GiB per GPU, the busiest pipeline stage)."""
    cl = p.cluster
    lines = [f"{p.preset}: {p.seq_length} tokens per pack ({p.tiles_per_pack} tiles), global batch "
             f"{p.global_batch_size} packs, on {cl.gpus} GPUs x {cl.gpu_mem_gib:g} GiB "
             f"({cl.usable_gib:.1f} GiB usable: {cl.fragmentation:.0%} kept for fragmentation)"]
    if not p.candidates:
        lines.append(f"NOTHING FITS ({p.considered} layouts checked). Why, and what would:")
        lines += [f"  - {a}" for a in p.advice]
        return "\n".join(lines)
    shown = p.candidates if top <= 0 else p.candidates[:top]
    spec = "Transformer Engine" if p.path == "te" else "local-spec"
    lines.append(f"{len(p.candidates)} of {p.considered} layouts fit; the fastest {len(shown)} (GiB per GPU, "
                 f"{spec} layers, busiest pipeline stage):")
    head = ("   tp pp vpp  cp  dp mbs recompute cp_comm | params grads optim activ logits buffers | total"
            " | step s   MFU")
    lines.append(head)
    for c in shown:
        m = c.memory.gib()
        lines.append(f"{'*' if c.recommended else ' '} {c.tp:3d} {c.pp:2d} {c.vpp:3d} {c.cp:3d} {c.dp:3d} "
                     f"{c.micro_batch_size:3d} "
                     f"{c.recompute:9s} {c.cp_comm_type if c.cp > 1 else '-':7s} | {m['parameters']:6.1f} "
                     f"{m['gradients']:5.1f} {m['optimizer']:5.1f} {m['activations']:5.1f} {m['logits']:6.1f} "
                     f"{m['buffers']:7.1f} | {m['total']:5.1f} | {c.step_seconds:6.2f} {c.mfu:5.1%}")
    r = p.recommended
    assert r is not None
    lines.append(f"* recommended: {' '.join(f'{k}={v}' for k, v in r.parallel_overrides().items())}")
    lines.append(f"  step time model: {cl.efficiency:.0%} of {cl.peak_flops / 1e12:.0f} TFLOP/s per GPU, NVLink "
                 f"{cl.intra_node_gbps:g} GB/s, inter-node {cl.inter_node_gbps:g} GB/s per GPU (docs/planning.md)")
    return "\n".join(lines)
