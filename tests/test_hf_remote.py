"""InternVL2 remote-code layout (InternLM2 LLM): hf.load vs a plain-torch forward written here from
the HF tensors directly (InternViT fused [q; k; v] ``attn.qkv``, InternLM2 per-KV-group ``wqkv``,
``w1``/``w3``/``w2`` SwiGLU), so the mapping is checked by an independent computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from v2pe_megatron.testing.distributed import run_distributed
from v2pe_megatron.testing.hf_fixtures import write_shards

V = dict(hidden=32, layers=2, heads=4, ffn=64, image=56, patch=14)
L = dict(hidden=32, layers=2, heads=4, kv=2, ffn=64, vocab=300, theta=10000.0, eps=1e-5)
CTX, TILE_TOKENS = 299, 4


def _config() -> dict:
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internlm2-chat",
        "downsample_ratio": 0.5, "select_layer": -1, "ps_version": "v2", "force_image_size": V["image"],
        "dynamic_image_size": True, "use_thumbnail": True, "max_dynamic_patch": 12,
        "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                          "hidden_size": V["hidden"], "num_hidden_layers": V["layers"],
                          "num_attention_heads": V["heads"], "intermediate_size": V["ffn"],
                          "image_size": V["image"], "patch_size": V["patch"], "num_channels": 3,
                          "layer_norm_eps": 1e-6, "qkv_bias": True, "qk_normalization": False,
                          "norm_type": "layer_norm", "hidden_act": "gelu", "drop_path_rate": 0.1,
                          "initializer_factor": 0.1},
        "llm_config": {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
                       "hidden_size": L["hidden"], "num_hidden_layers": L["layers"],
                       "num_attention_heads": L["heads"], "num_key_value_heads": L["kv"],
                       "intermediate_size": L["ffn"], "vocab_size": L["vocab"], "rms_norm_eps": L["eps"],
                       "rope_theta": L["theta"], "bias": False, "tie_word_embeddings": False,
                       "max_position_embeddings": 4096, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
    }


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    c, f, p = V["hidden"], V["ffn"], V["patch"]
    n = (V["image"] // p) ** 2 + 1
    t = {"vision_model.embeddings.class_embedding": r(1, 1, c),
         "vision_model.embeddings.position_embedding": r(1, n, c),
         "vision_model.embeddings.patch_embedding.weight": r(c, 3, p, p, scale=0.05),
         "vision_model.embeddings.patch_embedding.bias": r(c)}
    for i in range(V["layers"]):
        b = f"vision_model.encoder.layers.{i}"
        t.update({f"{b}.ls1": 1 + r(c), f"{b}.ls2": 1 + r(c), f"{b}.norm1.weight": 1 + r(c), f"{b}.norm1.bias": r(c),
                  f"{b}.norm2.weight": 1 + r(c), f"{b}.norm2.bias": r(c), f"{b}.attn.qkv.weight": r(3 * c, c, scale=0.3),
                  f"{b}.attn.qkv.bias": r(3 * c), f"{b}.attn.proj.weight": r(c, c, scale=0.3),
                  f"{b}.attn.proj.bias": r(c), f"{b}.mlp.fc1.weight": r(f, c, scale=0.3), f"{b}.mlp.fc1.bias": r(f),
                  f"{b}.mlp.fc2.weight": r(c, f, scale=0.3), f"{b}.mlp.fc2.bias": r(c)})
    h, inner = L["hidden"], 4 * c
    t.update({"mlp1.0.weight": 1 + r(inner), "mlp1.0.bias": r(inner), "mlp1.1.weight": r(h, inner, scale=0.2),
              "mlp1.1.bias": r(h), "mlp1.3.weight": r(h, h, scale=0.3), "mlp1.3.bias": r(h)})
    d = h // L["heads"]
    qkv_rows = (L["heads"] + 2 * L["kv"]) * d
    t["language_model.model.tok_embeddings.weight"] = r(L["vocab"], h, scale=1.0)
    for i in range(L["layers"]):
        b = f"language_model.model.layers.{i}"
        t.update({f"{b}.attention_norm.weight": 1 + r(h), f"{b}.ffn_norm.weight": 1 + r(h),
                  f"{b}.attention.wqkv.weight": r(qkv_rows, h, scale=0.3),
                  f"{b}.attention.wo.weight": r(h, h, scale=0.3),
                  f"{b}.feed_forward.w1.weight": r(L["ffn"], h, scale=0.3),
                  f"{b}.feed_forward.w3.weight": r(L["ffn"], h, scale=0.3),
                  f"{b}.feed_forward.w2.weight": r(h, L["ffn"], scale=0.3)})
    t["language_model.model.norm.weight"] = 1 + r(h)
    t["language_model.output.weight"] = r(L["vocab"], h, scale=0.3)
    return t


def _write(path: str, tensors: dict[str, torch.Tensor]) -> None:
    write_shards(path, tensors, _config(), {"<img>": 297, "</img>": 298, "<IMG_CONTEXT>": CTX})


# ---------------------------------------------------------------------------------------------
# Reference forward, straight from the remote-code semantics
# ---------------------------------------------------------------------------------------------
def _vit(t: dict, pixels: torch.Tensor) -> torch.Tensor:
    c, nh = V["hidden"], V["heads"]
    e = "vision_model.embeddings"
    x = F.conv2d(pixels, t[f"{e}.patch_embedding.weight"], t[f"{e}.patch_embedding.bias"], stride=V["patch"])
    b = x.shape[0]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([t[f"{e}.class_embedding"].expand(b, 1, -1), x], 1) + t[f"{e}.position_embedding"]
    for i in range(V["layers"]):
        p = f"vision_model.encoder.layers.{i}"
        y = F.layer_norm(x, (c,), t[f"{p}.norm1.weight"], t[f"{p}.norm1.bias"], 1e-6)
        B, N, C = y.shape
        qkv = (y @ t[f"{p}.attn.qkv.weight"].T + t[f"{p}.attn.qkv.bias"]).reshape(B, N, 3, nh, C // nh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // nh), -1) @ v
        a = a.transpose(1, 2).reshape(B, N, C) @ t[f"{p}.attn.proj.weight"].T + t[f"{p}.attn.proj.bias"]
        x = x + t[f"{p}.ls1"] * a
        y = F.layer_norm(x, (c,), t[f"{p}.norm2.weight"], t[f"{p}.norm2.bias"], 1e-6)
        y = F.gelu(y @ t[f"{p}.mlp.fc1.weight"].T + t[f"{p}.mlp.fc1.bias"]) @ t[f"{p}.mlp.fc2.weight"].T
        x = x + t[f"{p}.ls2"] * (y + t[f"{p}.mlp.fc2.bias"])
    x = x[:, 1:]
    side = int(x.shape[1] ** 0.5)
    x = x.reshape(b, side, side, -1)
    # InternVL pixel_shuffle, ps_version v2
    n, w, h, ch = x.shape
    x = x.view(n, w, h // 2, ch * 2).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, h // 2, w // 2, ch * 4).permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, -1, ch * 4)
    x = F.layer_norm(x, (ch * 4,), t["mlp1.0.weight"], t["mlp1.0.bias"], 1e-5)
    x = F.gelu(x @ t["mlp1.1.weight"].T + t["mlp1.1.bias"])
    return x @ t["mlp1.3.weight"].T + t["mlp1.3.bias"]


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _internlm2(t: dict, emb: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    h, nh, nkv = L["hidden"], L["heads"], L["kv"]
    d, gs = h // nh, nh // nkv
    inv = 1.0 / (L["theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = pos[..., None] * inv                                     # [b, s, d/2] float64
    cos = torch.cat([ang, ang], -1).cos().float()[:, None]         # [b, 1, s, d]
    sin = torch.cat([ang, ang], -1).sin().float()[:, None]

    def rope(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = emb
    b, s, _ = x.shape
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(L["layers"]):
        p = f"language_model.model.layers.{i}"
        y = _rms(x, t[f"{p}.attention_norm.weight"], L["eps"])
        qkv = (y @ t[f"{p}.attention.wqkv.weight"].T).reshape(b, s, nkv, gs + 2, d)   # "b q (h gs d)"
        q = qkv[..., :gs, :].reshape(b, s, nh, d).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2).repeat_interleave(gs, 1)
        v = qkv[..., -1, :].transpose(1, 2).repeat_interleave(gs, 1)
        q, k = rope(q), rope(k)
        sc = (q @ k.transpose(-2, -1)) / math.sqrt(d)
        a = torch.softmax(sc.masked_fill(~causal, float("-inf")), -1) @ v
        x = x + a.transpose(1, 2).reshape(b, s, h) @ t[f"{p}.attention.wo.weight"].T
        y = _rms(x, t[f"{p}.ffn_norm.weight"], L["eps"])
        y = (F.silu(y @ t[f"{p}.feed_forward.w1.weight"].T) * (y @ t[f"{p}.feed_forward.w3.weight"].T))
        x = x + y @ t[f"{p}.feed_forward.w2.weight"].T
    x = _rms(x, t["language_model.model.norm.weight"], L["eps"])
    return x @ t["language_model.output.weight"].T


def _inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 297, (2, 20), generator=g)
    ids[0, 2:2 + TILE_TOKENS] = CTX
    ids[1, 5:5 + 2 * TILE_TOKENS] = CTX
    pixels = torch.randn(3, 3, V["image"], V["image"], generator=g)
    pos = torch.arange(20, dtype=torch.float64).expand(2, -1).clone()
    pos[0, 2:6] = 1 + 0.125 * torch.arange(1, 5)
    pos[0, 6:] = 3 + torch.arange(14)
    return ids, pixels, pos


def _reference(t: dict) -> torch.Tensor:
    ids, pixels, pos = _inputs()
    emb = t["language_model.model.tok_embeddings.weight"][ids]
    feats = _vit(t, pixels).reshape(-1, L["hidden"])
    emb = emb.masked_scatter((ids == CTX)[..., None], feats)
    return _internlm2(t, emb, pos)


def ours(path: str):
    torch.set_num_threads(1)
    from v2pe_megatron import hf

    ids, pixels, pos = _inputs()
    model = hf.load(path)
    return model.logits(ids, pixels, pos), model.model_cfg.img_context_token_id, model.hf_layout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_remote_internlm2_layout_matches_plain_torch(tmp_path):
    tensors = _tensors()
    path = str(tmp_path / "remote")
    _write(path, tensors)
    with torch.no_grad():
        ref = _reference(tensors)
    got, ctx, layout = run_distributed(ours, 1, path, timeout=240)[0]
    assert (ctx, layout) == (CTX, "remote")
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-5, rel


def test_table_round_trip_and_te_names():
    """Export (megatron -> HF) inverts import; the table names the pre-norms as checkpoints do (TE's
    names, for both specs)."""
    from v2pe_megatron import hf

    tensors = _tensors()
    mc, layout = hf.model_config_from_hf(_config())
    assert layout == "remote" and mc.language.arch == "internlm2" and mc.vision.image_size == V["image"]
    table = hf.weight_map(mc, "remote")
    back = hf.megatron_to_hf(table, hf.hf_to_megatron(table, tensors))
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    # ViT qkv really is reordered (per head [q_h; k_h; v_h]), InternLM2 wqkv is not
    m = hf.hf_to_megatron(table, tensors)
    w = tensors["vision_model.encoder.layers.0.attn.qkv.weight"]
    d = V["hidden"] // V["heads"]
    got = m["vision_model.decoder.layers.0.self_attention.linear_qkv.weight"]
    assert torch.equal(got[d:2 * d], w[V["hidden"]:V["hidden"] + d])  # head 0's k rows
    names = {tm.mcore for tm in table}
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "vision_model.decoder.layers.1.mlp.linear_fc1.layer_norm_bias" in names
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in names)
