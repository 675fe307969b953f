"""``config.json`` <-> :class:`~v2pe_megatron.config.ModelConfig`, both HF layouts, and the V2PE keys.

Reading takes every shape from ``config.json``; writing emits a config the HF side accepts
(remote-code ``InternVLChatModel`` or transformers' ``InternVLConfig``) with every shape key, on top
of the source checkpoint's own config when there is one (so keys we do not model, like ``template``
or ``max_dynamic_patch``, survive a round trip).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional

from v2pe_megatron.config import LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig
from v2pe_megatron.convert.errors import HFCheckpointError

# The V2PE reference's keys: top level ``rope_pos_id_version`` / ``rope_pos_id_stride`` and, in the
# LLM config, ``rope_scaling: {"type": "v2pe", "factor": 1.0}``; delta = stride / 256.
V2PE_TILE = 256
V2PE_TOP_KEYS = ("rope_pos_id_version", "rope_pos_id_stride")

# ---------------------------------------------------------------------------------------------
# config.json -> ModelConfig
# ---------------------------------------------------------------------------------------------
def _pair(x: Any) -> int:
    if isinstance(x, (list, tuple)):
        if len(set(x)) != 1:
            raise HFCheckpointError(f"non-square size {x} is not supported")
        return int(x[0])
    return int(x)


def _req(d: dict, key: str, where: str) -> Any:
    if key not in d:
        raise HFCheckpointError(f"config.json: {where}.{key} is missing")
    return d[key]


def _language_from(tc: dict, where: str) -> LanguageConfig:
    arch_names = tc.get("architectures") or []
    mt = tc.get("model_type", "")
    if "InternLM2ForCausalLM" in arch_names or mt == "internlm2":
        arch = "internlm2"
    elif "Qwen2ForCausalLM" in arch_names or mt == "qwen2":
        arch = "qwen2"
    elif "LlamaForCausalLM" in arch_names or mt == "llama":
        arch = "llama"
    else:
        raise HFCheckpointError(f"config.json: {where} is neither InternLM2, Qwen2 nor Llama "
                                f"(architectures={arch_names}, model_type={mt!r})")
    heads = int(_req(tc, "num_attention_heads", where))
    hidden = int(_req(tc, "hidden_size", where))
    head_dim = tc.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise HFCheckpointError(f"config.json: {where}.head_dim={head_dim} x heads {heads} != hidden {hidden}")
    if arch == "qwen2":
        qkv_bias = True
    elif arch == "llama":
        qkv_bias = bool(tc.get("attention_bias", False))
    else:
        qkv_bias = bool(tc.get("bias", False))
        if qkv_bias:
            raise HFCheckpointError("config.json: InternLM2 with bias=true is not supported")
    return LanguageConfig(
        arch=arch, num_layers=int(_req(tc, "num_hidden_layers", where)), hidden_size=hidden,
        num_attention_heads=heads, num_query_groups=int(tc.get("num_key_value_heads") or heads),
        ffn_hidden_size=int(_req(tc, "intermediate_size", where)), vocab_size=int(_req(tc, "vocab_size", where)),
        norm_eps=float(tc.get("rms_norm_eps", 1e-6)), rotary_base=float(tc.get("rope_theta", 10000.0)
                                                                        if "rope_theta" in tc else
                                                                        (tc.get("rope_parameters") or {}).get(
                                                                            "rope_theta", 10000.0)),
        qkv_bias=qkv_bias, tie_word_embeddings=bool(tc.get("tie_word_embeddings", False)),
        max_position_embeddings=int(tc.get("max_position_embeddings", 32768)))


def model_config_from_hf(cfg: dict) -> tuple[ModelConfig, str]:
    """(ModelConfig, layout) from an InternVL config.json (remote-code or transformers-native)."""
    if "llm_config" in cfg:
        layout, vc, tc = "remote", _req(cfg, "vision_config", "root"), cfg["llm_config"]
        if cfg.get("ps_version", "v2") != "v2":
            raise HFCheckpointError(f"config.json: ps_version={cfg['ps_version']!r}; only the v2 pixel shuffle is supported")
        image = int(cfg.get("force_image_size") or _req(vc, "image_size", "vision_config"))
        vision = VisionConfig(
            num_layers=int(_req(vc, "num_hidden_layers", "vision_config")),
            hidden_size=int(_req(vc, "hidden_size", "vision_config")),
            num_attention_heads=int(_req(vc, "num_attention_heads", "vision_config")),
            ffn_hidden_size=int(_req(vc, "intermediate_size", "vision_config")),
            image_size=image, patch_size=int(_req(vc, "patch_size", "vision_config")),
            num_channels=int(vc.get("num_channels", 3)), layernorm_eps=float(vc.get("layer_norm_eps", 1e-6)),
            qkv_bias=bool(vc.get("qkv_bias", True)), qk_normalization=bool(vc.get("qk_normalization", False)),
            layer_scale_init=float(vc.get("initializer_factor", 0.1)), drop_path_rate=0.0,
            select_layer=int(cfg.get("select_layer", -1)))
        if vc.get("norm_type", "layer_norm") != "layer_norm":
            raise HFCheckpointError(f"config.json: vision_config.norm_type={vc['norm_type']!r} is not supported")
        where = "llm_config"
    elif "text_config" in cfg and "vision_config" in cfg:
        layout, vc, tc = "native", cfg["vision_config"], cfg["text_config"]
        if vc.get("norm_type", "layer_norm") != "layer_norm" or not vc.get("use_mean_pooling", True):
            raise HFCheckpointError("config.json: vision_config needs norm_type=layer_norm and use_mean_pooling=true")
        if cfg.get("vision_feature_layer", -1) != -1 or cfg.get("vision_feature_select_strategy", "default") != "default":
            raise HFCheckpointError("config.json: only vision_feature_layer=-1 with the default (CLS dropped) strategy "
                                    "is supported")
        if not vc.get("use_absolute_position_embeddings", True) or vc.get("use_mask_token", False):
            raise HFCheckpointError("config.json: vision_config needs use_absolute_position_embeddings=true and "
                                    "use_mask_token=false")
        if vc.get("hidden_act", "gelu") != "gelu" or cfg.get("projector_hidden_act", "gelu") != "gelu":
            raise HFCheckpointError("config.json: only exact GELU activations are supported")
        vision = VisionConfig(
            num_layers=int(_req(vc, "num_hidden_layers", "vision_config")),
            hidden_size=int(_req(vc, "hidden_size", "vision_config")),
            num_attention_heads=int(_req(vc, "num_attention_heads", "vision_config")),
            ffn_hidden_size=int(_req(vc, "intermediate_size", "vision_config")),
            image_size=_pair(_req(vc, "image_size", "vision_config")),
            patch_size=_pair(_req(vc, "patch_size", "vision_config")),
            num_channels=int(vc.get("num_channels", 3)), layernorm_eps=float(vc.get("layer_norm_eps", 1e-6)),
            qkv_bias=bool(vc.get("attention_bias", False)), qk_normalization=bool(vc.get("use_qk_norm", False)),
            layer_scale_init=float(vc.get("layer_scale_init_value", 0.1)), drop_path_rate=0.0)
        where = "text_config"
    else:
        raise HFCheckpointError("config.json is neither an InternVL remote-code config (llm_config) nor a "
                                "transformers InternVLConfig (text_config + vision_config)")
    language = _language_from(tc, where)
    if layout == "native" and "tie_word_embeddings" not in tc and "tie_word_embeddings" in cfg:
        language.tie_word_embeddings = bool(cfg["tie_word_embeddings"])
    projector = ProjectorConfig(downsample_ratio=float(cfg.get("downsample_ratio", 0.5)))
    mc = ModelConfig(vision=vision, projector=projector, language=language, spec="local", dtype="fp32")
    if "image_token_id" in cfg:
        mc.img_context_token_id = int(cfg["image_token_id"])
    return mc, layout


# ---------------------------------------------------------------------------------------------
# Tokenizer files -> special token ids
# ---------------------------------------------------------------------------------------------
# The tokenizer files that list added tokens (special_token_ids reads them in this order).
TOKEN_FILES = ("tokenizer.json", "added_tokens.json", "tokenizer_config.json")


def special_token_ids(hf_dir: str | os.PathLike) -> dict[str, int]:
    """content -> id of the added tokens in the :data:`TOKEN_FILES` of an HF folder."""
    d = Path(hf_dir)
    ids: dict[str, int] = {}
    tj = d / TOKEN_FILES[0]
    if tj.is_file():
        for t in json.loads(tj.read_text()).get("added_tokens", []):
            ids.setdefault(t["content"], int(t["id"]))
    at = d / TOKEN_FILES[1]
    if at.is_file():
        for k, v in json.loads(at.read_text()).items():
            ids.setdefault(k, int(v))
    tc = d / TOKEN_FILES[2]
    if tc.is_file():
        for k, v in (json.loads(tc.read_text()).get("added_tokens_decoder") or {}).items():
            ids.setdefault(v["content"] if isinstance(v, dict) else str(v), int(k))
    return ids


# ---------------------------------------------------------------------------------------------
# ModelConfig -> config.json
# ---------------------------------------------------------------------------------------------
_TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_ARCH = {"internlm2": ("InternLM2ForCausalLM", "internlm2"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
         "llama": ("LlamaForCausalLM", "llama")}


def v2pe_stride(delta: float) -> int:
    """The reference's integer stride for an inference delta; a clear error when there is none."""
    if not 0.0 < delta <= 1.0:
        raise HFCheckpointError(f"--v2pe-delta {delta} must be in (0, 1]")
    stride = round(delta * V2PE_TILE)
    if abs(stride - delta * V2PE_TILE) > 1e-9 or stride < 1:
        raise HFCheckpointError(f"--v2pe-delta {delta}: delta x {V2PE_TILE} = {delta * V2PE_TILE:g} is not an integer "
                                f"stride; use k/{V2PE_TILE} for an integer k in 1..{V2PE_TILE} (e.g. 0.0625 = 16/256)")
    return stride


def v2pe_keys(delta: float) -> dict[str, Any]:
    """The config.json keys the V2PE reference writes for inference at ``delta``."""
    return {"rope_pos_id_version": "v2pe_fix", "rope_pos_id_stride": v2pe_stride(delta),
            "rope_scaling": {"type": "v2pe", "factor": 1.0}}


def v2pe_recipe_section(cfg: dict) -> Optional[dict[str, Any]]:
    """The recipe's ``v2pe`` section that matches a V2PE source config (None for a plain model)."""
    version = cfg.get("rope_pos_id_version")
    if version in (None, "default"):
        return None
    if version == "v2pe_fix":
        stride = int(cfg.get("rope_pos_id_stride") or V2PE_TILE)
        return {"policy": "fixed", "delta": stride / V2PE_TILE}
    if version == "v2pe_rnd":
        return {"policy": "random"}  # the reference draws strides 1, 2, 4, ..., 256: the default delta_set
    raise HFCheckpointError(f"config.json: rope_pos_id_version={version!r} is unknown (default, v2pe_fix, v2pe_rnd)")


def _llm_config(lm: ModelConfig, base: dict) -> dict:
    lc = lm.language
    arch, mt = _ARCH[lc.arch]
    out = dict(base)
    out.update({"architectures": [arch], "model_type": mt, "hidden_size": lc.hidden_size,
                "num_hidden_layers": lc.num_layers, "num_attention_heads": lc.num_attention_heads,
                "num_key_value_heads": lc.num_query_groups, "intermediate_size": lc.ffn_hidden_size,
                "vocab_size": lc.vocab_size, "rms_norm_eps": lc.norm_eps, "rope_theta": lc.rotary_base,
                "tie_word_embeddings": lc.tie_word_embeddings,
                "max_position_embeddings": lc.max_position_embeddings,
                "head_dim": lc.hidden_size // lc.num_attention_heads, "hidden_act": "silu"})
    if isinstance(out.get("rope_parameters"), dict):  # transformers >= 5 keeps theta here
        out["rope_parameters"] = {**out["rope_parameters"], "rope_theta": lc.rotary_base}
    if lc.arch == "internlm2":
        out["bias"] = False
    elif lc.arch == "llama":
        out["attention_bias"] = lc.qkv_bias
    return out


def hf_config_from_model(mc: ModelConfig, layout: str, *, source: Optional[dict] = None,
                         v2pe_delta: Optional[float] = None) -> dict:
    """config.json for ``layout`` (``remote`` | ``native``): the source checkpoint's config (if any) with
    every shape key set from ``mc``. ``v2pe_delta`` writes the V2PE inference keys; without it the
    source's V2PE keys are carried through."""
    dtype = _TORCH_DTYPE[mc.dtype]
    src = copy.deepcopy(source or {})
    src_layout = None
    if source is not None:
        src_layout = "remote" if "llm_config" in source else "native"
    if src_layout != layout:  # another layout's keys would only confuse the HF side; keep V2PE's
        src = {k: src[k] for k in V2PE_TOP_KEYS if k in src}
        llm_src = {}
        rope = ((source or {}).get("llm_config") or (source or {}).get("text_config") or {}).get("rope_scaling")
        if rope and rope.get("type") == "v2pe":
            llm_src["rope_scaling"] = rope
    else:
        llm_src = src.get("llm_config" if layout == "remote" else "text_config") or {}
    v = mc.vision
    if layout == "remote":
        vc = dict(src.get("vision_config") or {})
        vc.update({"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                   "hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
                   "num_attention_heads": v.num_attention_heads, "intermediate_size": v.ffn_hidden_size,
                   "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": v.num_channels,
                   "layer_norm_eps": v.layernorm_eps, "qkv_bias": v.qkv_bias,
                   "qk_normalization": v.qk_normalization, "norm_type": "layer_norm", "hidden_act": "gelu",
                   "initializer_factor": v.layer_scale_init, "torch_dtype": dtype})
        vc.setdefault("drop_path_rate", v.drop_path_rate)
        out = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internlm2-chat",
               "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12}
        out.update(src)
        llm = _llm_config(mc, llm_src)
        llm["torch_dtype"] = dtype
        out.update({"vision_config": vc, "llm_config": llm, "force_image_size": v.image_size,
                    "downsample_ratio": mc.projector.downsample_ratio, "ps_version": "v2",
                    "select_layer": v.select_layer, "tie_word_embeddings": mc.language.tie_word_embeddings,
                    "torch_dtype": dtype})
    else:
        if mc.language.arch == "internlm2":
            raise HFCheckpointError("the transformers-native InternVL layout has no InternLM2 language model; "
                                    "use --layout remote-code")
        if v.select_layer != -1:
            raise HFCheckpointError(f"the transformers-native layout needs vision select_layer=-1, not {v.select_layer}")
        vc = dict(src.get("vision_config") or {})
        vc.update({"model_type": "internvl_vision", "hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
                   "num_attention_heads": v.num_attention_heads, "intermediate_size": v.ffn_hidden_size,
                   "image_size": [v.image_size, v.image_size], "patch_size": [v.patch_size, v.patch_size],
                   "num_channels": v.num_channels, "layer_norm_eps": v.layernorm_eps,
                   "attention_bias": v.qkv_bias, "use_qk_norm": v.qk_normalization, "norm_type": "layer_norm",
                   "hidden_act": "gelu", "use_mean_pooling": True, "use_absolute_position_embeddings": True,
                   "use_mask_token": False, "layer_scale_init_value": v.layer_scale_init})
        tc = _llm_config(mc, llm_src)
        tc.pop("architectures", None)
        if "rope_scaling" in tc and (tc["rope_scaling"] or {}).get("type") == "v2pe":
            # transformers validates rope_scaling and knows no "v2pe" type; the top-level keys carry it
            tc.pop("rope_scaling")
        out = {"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl"}
        out.update(src)
        out.update({"vision_config": vc, "text_config": tc, "downsample_ratio": mc.projector.downsample_ratio,
                    "image_token_id": mc.img_context_token_id, "vision_feature_layer": -1,
                    "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
                    "tie_word_embeddings": mc.language.tie_word_embeddings, "torch_dtype": dtype})
    if v2pe_delta is not None:
        keys = v2pe_keys(v2pe_delta)
        out["rope_pos_id_version"] = keys["rope_pos_id_version"]
        out["rope_pos_id_stride"] = keys["rope_pos_id_stride"]
        if layout == "remote":
            out["llm_config"]["rope_scaling"] = keys["rope_scaling"]
    return out


def read_config(hf_dir: str | os.PathLike) -> dict:
    p = Path(hf_dir) / "config.json"
    if not p.is_file():
        raise HFCheckpointError(f"{hf_dir}: config.json not found (give the folder of an HF checkpoint)")
    try:
        cfg = json.loads(p.read_text())
    except ValueError as e:  # also a UnicodeDecodeError
        raise HFCheckpointError(f"{p} is not valid JSON ({e}); restore the model's config.json") from None
    if not isinstance(cfg, dict):
        raise HFCheckpointError(f"{p} holds a JSON {type(cfg).__name__}, not an object; restore the model's "
                                f"config.json")
    return cfg
