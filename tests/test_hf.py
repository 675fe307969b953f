"""hf.load of a tiny random transformers-native InternVL (Qwen2 LLM) gives transformers' logits.

The reference is transformers' own ``InternVLForConditionalGeneration`` forward (fp32, eval). V2PE
float positions go to it as ``position_ids`` together with an all-ones ``attention_mask``: without a
mask, transformers reads non-unit position steps as packed-sequence boundaries and masks across them.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from v2pe_megatron.testing.distributed import run_distributed
from v2pe_megatron.testing.hf_fixtures import IMG_CTX, native_checkpoint

IMAGE = 56      # 4x4 patches of 14 -> 4 LLM tokens per tile
TILE_TOKENS = 4


def _make_checkpoint(path: str) -> None:
    native_checkpoint(path, vocab=300)  # <img> 297, </img> 298, <IMG_CONTEXT> 299 (IMG_CTX)


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 297, (2, 24), generator=g)
    ids[0, 3] = 297
    ids[0, 4:4 + TILE_TOKENS] = IMG_CTX
    ids[0, 4 + TILE_TOKENS] = 298
    ids[1, 2] = 297
    ids[1, 3:3 + 2 * TILE_TOKENS] = IMG_CTX
    ids[1, 3 + 2 * TILE_TOKENS] = 298
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=g)
    # V2PE positions (delta 1/4), built independently of v2pe_megatron
    pos = torch.zeros(2, 24, dtype=torch.float64)
    for r in range(2):
        p, prev_ctx = -1.0, False
        for j in range(24):
            if ids[r, j] == IMG_CTX:
                p += 0.25
            elif prev_ctx:
                p = float(torch.ceil(torch.tensor(p))) + 1
            else:
                p += 1
            prev_ctx = bool(ids[r, j] == IMG_CTX)
            pos[r, j] = p
    return ids, pixels, pos


def _resized_inputs():
    """84px tiles: 6x6 patches, bicubic-resized position embeddings, 9 tokens per tile."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 297, (1, 16), generator=g)
    ids[0, 3:12] = IMG_CTX
    return ids, torch.randn(1, 3, 84, 84, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def reference(path: str) -> dict:
    """transformers' logits, computed in the pytest process: megatron's CPU patches (active in the
    spawned ranks) must not touch the reference implementation."""
    from transformers import InternVLForConditionalGeneration

    ids, pixels, pos = _inputs()
    model = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    ones = torch.ones_like(ids)
    with torch.no_grad():
        return {"int": model(input_ids=ids, pixel_values=pixels, attention_mask=ones).logits,
                "v2pe": model(input_ids=ids, pixel_values=pixels, attention_mask=ones,
                              position_ids=pos.float()).logits,
                "text": model(input_ids=ids[:, 12:], attention_mask=ones[:, 12:]).logits,
                "resized": model(input_ids=_resized_inputs()[0], pixel_values=_resized_inputs()[1],
                                 attention_mask=torch.ones_like(_resized_inputs()[0])).logits,
                "numel": torch.tensor(sum(p.numel() for p in model.parameters()))}


def ours(path: str) -> dict:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from v2pe_megatron import hf

    dist.destroy_process_group()  # hf.load must set up its own 1-rank group
    ids, pixels, pos = _inputs()
    model = hf.load(path)
    assert not model.training and model.img_context_token_id == IMG_CTX
    ar = torch.arange(24, dtype=torch.float64).expand(2, -1)
    out = {"int": model.logits(ids, pixels, ar), "v2pe": model.logits(ids, pixels, pos),
           "text": model.logits(ids[:, 12:], None, None), "resized": model.logits(*_resized_inputs())}
    assert all(t.dtype == torch.float32 for t in out.values()) and out["int"].shape == (2, 24, 300)
    return out


def errors(path: str) -> dict:
    from safetensors.torch import load_file, save_file

    from v2pe_megatron import hf

    sd = load_file(os.path.join(path, "model.safetensors"))
    out = {}
    for case in ("missing", "extra", "shape"):
        d = os.path.join(path, case)
        os.makedirs(d, exist_ok=True)
        for f in ("config.json", "tokenizer_config.json"):
            with open(os.path.join(path, f)) as src, open(os.path.join(d, f), "w") as dst:
                dst.write(src.read())
        bad = dict(sd)
        if case == "missing":
            del bad["vision_tower.encoder.layer.1.lambda_2"]
        elif case == "extra":
            bad["language_model.model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
        else:
            bad["language_model.model.layers.0.mlp.up_proj.weight"] = torch.zeros(65, 32)
        save_file(bad, os.path.join(d, "model.safetensors"))
        try:
            hf.load(d)
            out[case] = "no error"
        except hf.HFCheckpointError as e:
            out[case] = str(e)
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_native_internvl_matches_transformers(tmp_path):
    pytest.importorskip("transformers")
    path = str(tmp_path / "hf")
    _make_checkpoint(path)
    ref = reference(path)
    got = run_distributed(ours, 1, path, timeout=240)[0]
    assert _rel(ref["v2pe"], ref["int"]) > 1e-3  # the float positions really reach the rotary
    from v2pe_megatron import hf
    from v2pe_megatron.model.internvl import parameter_count

    with open(os.path.join(path, "config.json")) as f:
        assert parameter_count(hf.model_config_from_hf(json.load(f))[0]) == int(ref["numel"])
    for key in ("int", "v2pe", "text", "resized"):
        assert _rel(got[key], ref[key]) <= 1e-5, (key, _rel(got[key], ref[key]))
    err = run_distributed(errors, 1, path, timeout=240)[0]
    assert "model.vision_tower.encoder.layer.1.lambda_2" in err["missing"], err
    assert "layers.9.mlp.up_proj.weight" in err["extra"], err
    assert "model.language_model.layers.0.mlp.up_proj.weight has shape (65, 32)" in err["shape"], err
    assert "(64, 32)" in err["shape"], err


def _tied_checkpoint(path: str) -> torch.Tensor:
    """A 1-layer Qwen2 with tied embeddings (InternVL2.5/3-1B style); returns transformers' logits."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = InternVLConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                           image_size=IMAGE, patch_size=14, attention_bias=True),
        text_config=dict(model_type="qwen2", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=300, tie_word_embeddings=True,
                         max_position_embeddings=1024, rope_theta=10000.0),
        image_token_id=IMG_CTX, downsample_ratio=0.5, tie_word_embeddings=True)
    torch.manual_seed(1)
    model = InternVLForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)  # no tokenizer files: the id comes from config.json's image_token_id
    ids, pixels, _ = _inputs()
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits


def ours_tied(path: str) -> torch.Tensor:
    torch.set_num_threads(1)
    from v2pe_megatron import hf

    model = hf.load(path)
    assert model.language_model.share_embeddings_and_output_weights
    ids, pixels, _ = _inputs()
    return model.logits(ids, pixels, None)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tied_embeddings_checkpoint(tmp_path):
    path = str(tmp_path / "tied")
    ref = _tied_checkpoint(path)
    got = run_distributed(ours_tied, 1, path, timeout=240)[0]
    assert _rel(got, ref) <= 1e-5
