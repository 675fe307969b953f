"""The analytic FLOPs count against hand calculations (tiny and InternVL2-2B shapes), Megatron's
6N + attention rule of thumb on text, and its promise to stay importable without torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from v2pe_megatron import flops
from v2pe_megatron.config import load_recipe


def _model(preset: str, *overrides: str):
    return load_recipe(None, [f"model.preset={preset}", *overrides]).model


def test_tiny_step_by_hand():
    # Two packed rows of 32: sub-samples 10, 6, 16 (tail) and 32; 3 tiles of 56 px.
    got = flops.step_flops(_model("tiny"), [10, 6, 16, 32], tiles=3)
    # LLM: 4 layers, h 64, 4 heads / 2 KV groups of dim 16, SwiGLU 128, vocab 512; 64 tokens.
    qkv = 64 * (4 * 16 + 2 * 2 * 16)          # 8192 MACs per token
    proj = 64 * 64                            # 4096
    mlp = 3 * 64 * 128                        # 24576 (gate, up, down)
    llm_dense = 4 * 64 * (qkv + proj + mlp)   # 9_437_184
    llm_attn = 4 * 64 * (10**2 + 6**2 + 16**2 + 32**2)   # causal: 2 products x (heads*dim) L^2 / 2
    logits = 64 * 64 * 512                    # 2_097_152
    # ViT: 2 layers, c 64, MLP 128, 56/14 = 4 -> 16 patches + CLS = 17 tokens per tile.
    embed = 16 * 64 * 3 * 14 * 14             # patch conv: 602_112 per tile
    vit_dense = 2 * 17 * (4 * 64 * 64 + 2 * 64 * 128)   # qkv + proj + fc1 + fc2: 1_114_112
    vit_attn = 2 * 2 * 17 * 17 * 64           # full attention: 73_984
    # Projector: 16 patches * 0.25 = 4 tokens per tile, Linear(256 -> 64) + Linear(64 -> 64).
    proj_macs = 4 * (256 * 64 + 64 * 64)      # 81_920
    forward_macs = llm_dense + llm_attn + logits + 3 * (embed + vit_dense + vit_attn + proj_macs)
    assert forward_macs == 17_513_216
    assert got.forward == 2 * forward_macs
    assert got.model == 6 * forward_macs == 105_079_296
    assert got.recompute == 0 and got.hardware == got.model
    assert (got.tokens, got.tiles) == (64, 3)
    assert got.parts["llm_attention"] == 2 * llm_attn and got.parts["vit_embed"] == 2 * 3 * embed


def test_internvl2_2b_step_by_hand():
    # One 8K row: sub-samples 4096, 2048, 2048; 8 tiles of 448 px.
    got = flops.step_flops(_model("internvl2-2b"), [4096, 2048, 2048], tiles=8)
    # InternLM2-1.8B: 24 layers, h 2048, 16 heads / 8 KV groups of 128, FFN 8192, vocab 92553.
    per_token = 2048 * (16 + 2 * 8) * 128 + 2048 * 2048 + 3 * 2048 * 8192   # 62_914_560
    llm_dense = 24 * 8192 * per_token
    llm_attn = 24 * 2048 * (4096**2 + 2 * 2048**2)
    logits = 8192 * 2048 * 92553
    # InternViT-300M: 24 layers, c 1024, MLP 4096, 32 x 32 patches + CLS = 1025 tokens per tile.
    embed = 1024 * 1024 * 3 * 14 * 14
    vit_dense = 24 * 1025 * (4 * 1024**2 + 2 * 1024 * 4096)
    vit_attn = 24 * 2 * 1025**2 * 1024
    # Projector: 256 tokens per tile, Linear(4096 -> 2048) + Linear(2048 -> 2048).
    proj_macs = 256 * (4096 * 2048 + 2048 * 2048)
    forward_macs = llm_dense + llm_attn + logits + 8 * (embed + vit_dense + vit_attn + proj_macs)
    assert got.model == 6 * forward_macs == 108_476_280_078_336   # ~108.5 TFLOP per step
    # Recompute: selective re-runs the attention cores, full each layer's forward.
    sel = flops.step_flops(_model("internvl2-2b"), [4096, 2048, 2048], tiles=8, recompute="selective")
    assert sel.model == got.model and sel.recompute == 2 * (llm_attn + 8 * vit_attn)
    full = flops.step_flops(_model("internvl2-2b"), [4096, 2048, 2048], tiles=8, recompute="full")
    assert full.recompute == 2 * (llm_dense + llm_attn + 8 * (vit_dense + vit_attn))
    assert full.hardware == full.model + full.recompute


def test_text_matches_megatron_rule_of_thumb():
    """6 N T + 6 layers h sum(L^2) (Megatron's estimate with causal attention at half cost), N the
    LLM's matmul parameters with the output layer and without the embedding lookup."""
    from v2pe_megatron.model.internvl import parameter_count

    cfg = _model("internvl2-2b")
    no_layers = _model("internvl2-2b", "model.language.num_layers=0")
    lm = cfg.language
    # Layers' parameters (norm weights included: 2h per layer, a 6e-5 relative excess) + output layer.
    n = parameter_count(cfg) - parameter_count(no_layers) + lm.vocab_size * lm.hidden_size
    lens = [8192, 4096, 4096, 16384]
    rule = 6 * n * sum(lens) + 6 * lm.num_layers * lm.hidden_size * sum(x * x for x in lens)
    got = flops.step_flops(cfg, lens, tiles=0)
    assert got.model == pytest.approx(rule, rel=1e-4)


# Device names as torch.cuda.get_device_name() (and nvidia-smi) report them -> dense bf16 TFLOP/s.
DEVICE_PEAKS = {
    "NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H100 NVL": 835,
    "NVIDIA H200": 989, "NVIDIA H200 NVL": 835, "NVIDIA GH200 480GB": 989,
    "NVIDIA H800": 989, "NVIDIA H800 PCIe": 756,
    "NVIDIA B200": 2250, "NVIDIA GB200": 2500,
    "NVIDIA A100-SXM4-80GB": 312, "NVIDIA A100-SXM4-40GB": 312, "NVIDIA A100 80GB PCIe": 312,
    "NVIDIA A100-PCIE-40GB": 312, "NVIDIA A800-SXM4-80GB": 312, "NVIDIA A800 40GB Active": 312,
    "NVIDIA L40S": 362, "NVIDIA L40": 181, "NVIDIA L4": 121,
    # No vendor data sheet, no table entry (train.peak_tflops gives one); a MIG slice is part of a device.
    "NVIDIA H20": None, "NVIDIA A10G": None, "NVIDIA A100-SXM4-40GB MIG 3g.20gb": None,
}


@pytest.mark.parametrize("name", sorted(DEVICE_PEAKS))
def test_peak_table_by_device_name(name):
    want = DEVICE_PEAKS[name]
    assert flops.peak_flops_for(name, "bf16") == (want * 1e12 if want else None)
    assert flops.peak_flops_for(name, "fp16") == flops.peak_flops_for(name, "bf16")


def test_peak_table_and_overrides():
    # Never guessed: fp32, unknown devices and the CPU have no peak unless the recipe gives one.
    assert flops.peak_flops_for("NVIDIA H100 80GB HBM3", "fp32") is None
    assert flops.peak_flops_for("Some Accelerator 9000", "bf16") is None
    assert flops.peak_flops_for(None, "bf16") is None
    assert flops.peak_flops_for(None, "fp32", override_tflops=0.5) == 0.5e12
    assert flops.peak_flops_for("NVIDIA H100 80GB HBM3", "bf16", override_tflops=700) == 700e12


def test_module_imports_only_the_standard_library():
    # The planner imports it where torch is absent: no torch, megatron or package imports.
    tree = ast.parse(Path(flops.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= {"__future__", "collections", "dataclasses", "typing", "math"}, names
