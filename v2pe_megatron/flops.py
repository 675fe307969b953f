"""Analytic FLOPs of a training step, and the peak FLOP/s of the devices MFU is measured against.

Torch-free on purpose (only the standard library): the memory / step-time planner imports it on a
machine without torch. Model shapes are read by attribute from a ``ModelConfig``-like object
(``.language``, ``.vision``, ``.projector``), so any object with those fields works.

Conventions (what is counted, what is not):

- A matmul of [m, k] x [k, n] is m*k*n multiply-accumulates (MACs); forward FLOPs = 2 x MACs;
  backward = 2 x forward (gradients of the inputs and of the weights); model FLOPs = 3 x forward.
- Counted: every linear layer (ViT patch embedding, QKV with grouped KV heads, output projection,
  MLPs, projector, logits) and the attention core (Q K^T and the attention-weighted V).
  Not counted: norms, softmax, activations, rotary, residual adds, the embedding lookup, the loss:
  element-wise work that is O(tokens x hidden), not O(tokens x hidden^2).
- LLM attention is causal and never crosses a sub-sample: per layer, for each sub-sample of L
  tokens, Q K^T and A V are each heads x head_dim x L^2 / 2 MACs (L^2/2, Megatron's convention,
  not L(L+1)/2). The sub-samples are the packed lengths as computed (``MicroBatch.seq_lens``:
  each padded to the layout's multiple, the pack's padding tail as its own sub-sample).
- InternViT attention is full (non-causal) over each tile's patches plus CLS:
  2 x N^2 x hidden MACs per layer and tile, N = (image/patch)^2 + 1.
- Recompute adds forward work that is not model FLOPs: ``selective`` re-runs the attention core
  (megatron's ``core_attn`` recompute, in the LLM and in the ViT, which shares the recipe's
  ``train.recompute``), ``full`` re-runs each transformer layer's forward (not the logits, the
  patch embedding or the projector). ``hardware = model + recompute``; MFU uses model FLOPs.
- Frozen parts are counted like trained ones (the 6N convention; what is skipped in the backward
  of a frozen tower depends on what precedes it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["StepFlops", "llm_forward_macs", "vit_forward_macs", "projector_forward_macs", "step_flops",
           "PEAK_BF16_FLOPS", "peak_flops_for"]


def _llm_dims(lm: Any) -> tuple[int, int, int, int, int, int, int]:
    h, nh, ng = lm.hidden_size, lm.num_attention_heads, lm.num_query_groups
    d = h // nh
    return lm.num_layers, h, nh, ng, d, lm.ffn_hidden_size, lm.vocab_size


def llm_forward_macs(lm: Any, seq_lens: Iterable[int]) -> dict[str, float]:
    """Forward MACs of the LLM over sub-samples of ``seq_lens`` tokens: ``dense`` (QKV, output
    projection, SwiGLU MLP, all layers), ``attention`` (the causal core, all layers), ``logits``."""
    layers, h, nh, ng, d, f, v = _llm_dims(lm)
    lens = [int(n) for n in seq_lens]
    tokens = sum(lens)
    per_token_layer = h * (nh + 2 * ng) * d + nh * d * h + 3 * h * f   # QKV + proj + (gate, up, down)
    return {
        "dense": float(layers * tokens * per_token_layer),
        # Q K^T and A V: 2 products of nh * d * L^2 / 2 MACs each.
        "attention": float(layers * sum(nh * d * n * n for n in lens)),
        "logits": float(tokens * h * v),
    }


def vit_forward_macs(vit: Any, tiles: int) -> dict[str, float]:
    """Forward MACs of InternViT over ``tiles`` tiles: ``embed`` (patch conv), ``dense`` (qkv, proj,
    MLP over patches + CLS), ``attention`` (full attention core)."""
    c, f = vit.hidden_size, vit.ffn_hidden_size
    patches = (vit.image_size // vit.patch_size) ** 2
    n = patches + 1
    embed = patches * c * vit.num_channels * vit.patch_size ** 2
    dense = vit.num_layers * n * (3 * c * c + c * c + 2 * c * f)
    attention = vit.num_layers * 2 * n * n * c
    return {"embed": float(tiles * embed), "dense": float(tiles * dense), "attention": float(tiles * attention)}


def projector_forward_macs(model_cfg: Any, tiles: int) -> float:
    """Forward MACs of the projector: (image/patch)^2 r^2 tokens per tile through
    Linear(c / r^2 -> H) and Linear(H -> H) (pixel shuffle is a reshape)."""
    vit, lm, r = model_cfg.vision, model_cfg.language, model_cfg.projector.downsample_ratio
    side = vit.image_size // vit.patch_size
    out_tokens = int(round(side * side * r * r))
    inner = int(round(vit.hidden_size / (r * r)))
    h = lm.hidden_size
    return float(tiles * out_tokens * (inner * h + h * h))


@dataclass
class StepFlops:
    """FLOPs of one training step (forward + backward), summed over whatever batches were given."""

    model: float                      # 3 x forward: what MFU divides
    recompute: float                  # forward work re-run by activation recompute
    forward: float
    tokens: int                       # LLM tokens (padded sub-sample lengths summed)
    tiles: int
    parts: dict[str, float] = field(default_factory=dict)   # forward FLOPs per part

    @property
    def hardware(self) -> float:
        return self.model + self.recompute


def step_flops(model_cfg: Any, seq_lens: Iterable[int], tiles: int = 0, *, recompute: str = "none") -> StepFlops:
    """FLOPs of a training step over LLM sub-samples of ``seq_lens`` tokens (all rows of all
    micro-batches of all data-parallel ranks, flattened) and ``tiles`` image tiles."""
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute={recompute!r} is not one of none, selective, full")
    lens = [int(n) for n in seq_lens]
    llm = llm_forward_macs(model_cfg.language, lens)
    vit = vit_forward_macs(model_cfg.vision, tiles) if tiles else {"embed": 0.0, "dense": 0.0, "attention": 0.0}
    proj = projector_forward_macs(model_cfg, tiles) if tiles else 0.0
    parts = {"llm_dense": 2 * llm["dense"], "llm_attention": 2 * llm["attention"], "logits": 2 * llm["logits"],
             "vit_embed": 2 * vit["embed"], "vit_dense": 2 * vit["dense"], "vit_attention": 2 * vit["attention"],
             "projector": 2 * proj}
    forward = sum(parts.values())
    if recompute == "selective":
        rec = parts["llm_attention"] + parts["vit_attention"]
    elif recompute == "full":
        rec = parts["llm_dense"] + parts["llm_attention"] + parts["vit_dense"] + parts["vit_attention"]
    else:
        rec = 0.0
    return StepFlops(model=3 * forward, recompute=rec, forward=forward, tokens=sum(lens), tiles=int(tiles),
                     parts=parts)


# ---------------------------------------------------------------------------------------------
# Peak dense FLOP/s per device (bf16 / fp16 tensor cores, no sparsity). NVIDIA's data sheets give the
# tensor-core figures with 2:4 sparsity ("* With sparsity"); the dense figure is half of it. Keys
# are matched against torch.cuda.get_device_name() word by word ("H20" is not "H200", "B200" not
# "GB200"); the first match wins, so a variant comes before its family ("H100 PCIe" before "H100").
# A device without a vendor data sheet (H20, A10G) is left out: its MFU needs train.peak_tflops.
# ---------------------------------------------------------------------------------------------
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    # nvidia.com/en-us/data-center/grace-hopper-superchip: GH200, FP16/BF16 Tensor Core 1,979 TFLOPS*
    ("GH200", 989e12),
    # nvidia.com/en-us/data-center/h100 (H100 data sheet): BFLOAT16 Tensor Core, with sparsity,
    # H100 SXM 1,979, H100 NVL 1,671, H100 PCIe 1,513 TFLOPS
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),        # SXM5: "NVIDIA H100 80GB HBM3"
    # nvidia.com/en-us/data-center/h200 (H200 data sheet): BFLOAT16 Tensor Core, with sparsity,
    # H200 SXM 1,979, H200 NVL 1,671 TFLOPS
    ("H200 NVL", 835e12),
    ("H200", 989e12),        # SXM: "NVIDIA H200"
    # NVIDIA H800 data sheet (nvidia.cn/data-center/h800): BFLOAT16 Tensor Core, with sparsity,
    # H800 SXM5 1,979, H800 PCIe 1,513 TFLOPS (H100 silicon, NVLink cut)
    ("H800 PCIe", 756e12),
    ("H800", 989e12),
    # nvidia.com/en-us/data-center/gb200-nvl72: per Blackwell GPU, FP16/BF16 Tensor Core 5 PFLOPS*
    ("GB200", 2500e12),
    # nvidia.com/en-us/data-center/hgx (HGX B200): per GPU, FP16/BF16 Tensor Core 4.5 PFLOPS*
    ("B200", 2250e12),
    # nvidia.com/en-us/data-center/a100 (A100 data sheet): BFLOAT16 Tensor Core 312 | 624* TFLOPS
    ("A100", 312e12),
    # NVIDIA A800 40GB Active data sheet (nvidia.com/en-us/design-visualization/a800): BFLOAT16
    # Tensor Core 312 | 624* TFLOPS (A100 silicon, NVLink cut)
    ("A800", 312e12),
    # nvidia.com/en-us/data-center/l40s (L40S data sheet): BFLOAT16 Tensor Core 362.05 | 733* TFLOPS
    ("L40S", 362e12),
    # nvidia.com/en-us/data-center/l40 (L40 data sheet): BFLOAT16 Tensor Core 181.05 | 362.1* TFLOPS
    ("L40", 181e12),
    # nvidia.com/en-us/data-center/l4 (L4 data sheet): BFLOAT16 Tensor Core 242* TFLOPS
    ("L4", 121e12),
)


def _words(text: str) -> list[str]:
    return "".join(c if c.isalnum() else " " for c in text.lower()).split()


def _table_peak(device_name: str) -> Optional[float]:
    """The table's dense bf16 peak for a device as ``torch.cuda.get_device_name()`` names it, or None.
    A MIG slice ("NVIDIA A100-SXM4-40GB MIG 3g.20gb") has only part of the device: None."""
    name = _words(device_name)
    if "mig" in name:
        return None
    for key, peak in PEAK_BF16_FLOPS:
        k = _words(key)
        if any(name[i:i + len(k)] == k for i in range(len(name) - len(k) + 1)):
            return peak
    return None


def peak_flops_for(device_name: Optional[str], dtype: str, *, override_tflops: float = 0.0) -> Optional[float]:
    """Peak FLOP/s of one device for a run in ``dtype`` (fp32 | bf16 | fp16), or None when unknown.

    ``override_tflops`` (the recipe's ``train.peak_tflops``, per device) wins when > 0. Otherwise the
    table applies to bf16 and fp16 runs only. fp32 runs get None: their peak depends on whether
    torch routes matmuls through TF32 (``torch.backends.cuda.matmul.allow_tf32``, off by default),
    and MFU against the bf16 peak would read as ~15x too low; give ``train.peak_tflops`` to have one.
    A device that is not in the table (or the CPU: ``device_name`` None) gets None: never a guess.
    """
    if override_tflops and override_tflops > 0:
        return float(override_tflops) * 1e12
    if device_name is None or dtype not in ("bf16", "fp16"):
        return None
    return _table_peak(device_name)
