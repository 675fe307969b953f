"""Tiny HF InternVL checkpoints with random weights, for the converter's tests.

``remote_checkpoint``: the remote-code layout of any ``ModelConfig`` (config.json from
``hf_config_from_model``, tensors with the shapes the table implies, split over two shards with an
index). ``native_checkpoint``: transformers' own ``InternVLForConditionalGeneration`` (Qwen2 LLM),
saved by ``save_pretrained``.
"""

from __future__ import annotations

import json
import os

import torch

IMG_START, IMG_END, IMG_CTX = 297, 298, 299


def mcore_shapes(mc) -> dict[str, tuple[int, ...]]:
    """megatron parameter shapes of a whole (TP = PP = 1) model of ``mc``, by checkpoint name."""
    from v2pe_megatron.model.checkpoint_names import checkpoint_name
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import Layout
    from v2pe_megatron.runtime.distributed import model_parallel

    with model_parallel(1, 1):
        m = build_model(mc, Layout(spec="local"), pre_process=True, post_process=True)
        return {checkpoint_name(k): tuple(p.shape) for k, p in m.named_parameters()}


def remote_tensors(mc, seed: int = 0) -> dict[str, torch.Tensor]:
    from v2pe_megatron.convert.mappings import hf_shapes, weight_map

    shapes = mcore_shapes(mc)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for mp in weight_map(mc, "remote"):
        for name, shape in zip(mp.hf, hf_shapes(mp, shapes[mp.mcore])):
            t = torch.randn(*shape, generator=g) * 0.2
            if "norm" in name or name.endswith(("ls1", "ls2")) or "mlp1.0.weight" in name:
                t = t + 1.0  # norms and layer scale near 1, as trained models have them
            out[name] = t
    return out


def write_shards(path: str, tensors: dict[str, torch.Tensor], config: dict, tokens: dict[str, int]) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(path, "added_tokens.json"), "w") as f:
        json.dump(tokens, f)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, os.path.join(path, fname))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}, f)


def remote_checkpoint(path: str, mc, *, seed: int = 0, extra_config: dict | None = None) -> dict[str, torch.Tensor]:
    from v2pe_megatron.convert.hf_config import hf_config_from_model

    tensors = remote_tensors(mc, seed)
    cfg = hf_config_from_model(mc, "remote")
    cfg.update(extra_config or {})
    write_shards(path, tensors, cfg, {"<img>": mc.img_start_token_id, "</img>": mc.img_end_token_id,
                                      "<IMG_CONTEXT>": mc.img_context_token_id})
    return tensors


def tiny_model_config():
    """The ``tiny`` preset's model (the shapes v2pe-train's tiny recipe trains)."""
    from v2pe_megatron.testing.tiny import tiny_recipe

    return tiny_recipe().model


def native_checkpoint(path: str, *, vocab: int = 301, seed: int = 0) -> None:
    """transformers' InternVL (2-layer Qwen2, GQA, qkv bias, untied head; vocab odd so TP pads it)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = InternVLConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           image_size=56, patch_size=14, attention_bias=True, layer_norm_eps=1e-6),
        text_config=dict(model_type="qwen2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=vocab, tie_word_embeddings=False,
                         max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6),
        image_token_id=IMG_CTX, downsample_ratio=0.5, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # layer scale and norms away from their constant inits so the mapping shows
        for name, p in model.named_parameters():
            if "lambda" in name or "norm" in name or "cls_token" in name or "position_embeddings" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": {str(IMG_CTX): {"content": "<IMG_CONTEXT>", "special": True},
                                            str(IMG_START): {"content": "<img>", "special": True},
                                            str(IMG_END): {"content": "</img>", "special": True}}}, f)
