"""HuggingFace InternVL checkpoints <-> the megatron-core InternVL model, in memory.

Two HF layouts (docs/internvl.md):

- ``remote``: InternVL2 remote-code checkpoints (``InternVLChatModel``; ``vision_model.*``, ``mlp1.*``,
  ``language_model.*`` with InternLM2 ``wqkv`` names, or Qwen2/Llama names for InternVL2-1B/4B...).
- ``native``: transformers' ``InternVLForConditionalGeneration`` (``model.vision_tower.*``,
  ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head``).

The mapping is one declarative table (:func:`weight_map`): each entry names a megatron parameter,
the HF tensor(s) it comes from, and a transform that works in both directions, so the converter CLI
can export with the same table. Every shape comes from ``config.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from v2pe_megatron.config import LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig


class HFCheckpointError(ValueError):
    """A checkpoint that does not match its config or our model; the message names the tensor."""


# ---------------------------------------------------------------------------------------------
# Transforms (both directions)
# ---------------------------------------------------------------------------------------------
def qkv_to_megatron(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_groups: int) -> Tensor:
    """Separate q [nh*d, ...], k/v [ng*d, ...] -> megatron's fused rows, per KV group [q heads; k; v]."""
    d = q.shape[0] // num_heads
    rest = q.shape[1:]
    qg = q.reshape(num_groups, (num_heads // num_groups) * d, *rest)
    kg = k.reshape(num_groups, d, *rest)
    vg = v.reshape(num_groups, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def qkv_from_megatron(w: Tensor, num_heads: int, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    qpg = num_heads // num_groups
    d = w.shape[0] // (num_groups * (qpg + 2))
    rest = w.shape[1:]
    g = w.reshape(num_groups, (qpg + 2) * d, *rest)
    q, k, v = torch.split(g, [qpg * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


@dataclass(frozen=True)
class TensorMap:
    """megatron ``mcore`` <-> HF ``hf`` tensors under ``transform``:

    - ``copy``: one tensor, same layout;
    - ``qkv``: hf = (q, k, v) -> per-group fused rows (``heads``, ``groups``);
    - ``qkv_fused``: hf = one [all q; all k; all v] tensor (InternViT ``attn.qkv``) -> per-group rows;
    - ``cat``: hf tensors concatenated on dim 0 (gated MLP fc1 = [gate; up]).
    """

    mcore: str
    hf: tuple[str, ...]
    transform: str = "copy"
    heads: int = 0
    groups: int = 0

    def to_megatron(self, ts: list[Tensor]) -> Tensor:
        if self.transform == "copy":
            return ts[0]
        if self.transform == "qkv":
            return qkv_to_megatron(*ts, self.heads, self.groups)
        if self.transform == "qkv_fused":
            q, k, v = torch.chunk(ts[0], 3, dim=0)
            return qkv_to_megatron(q, k, v, self.heads, self.groups)
        if self.transform == "cat":
            return torch.cat(ts, dim=0)
        raise ValueError(self.transform)

    def to_hf(self, t: Tensor) -> list[Tensor]:
        if self.transform == "copy":
            return [t]
        if self.transform == "qkv":
            return list(qkv_from_megatron(t, self.heads, self.groups))
        if self.transform == "qkv_fused":
            return [torch.cat(qkv_from_megatron(t, self.heads, self.groups), dim=0)]
        if self.transform == "cat":
            return list(torch.chunk(t, len(self.hf), dim=0))
        raise ValueError(self.transform)


def _norm_names(prefix: str, which: str, spec: str, bias: bool) -> list[tuple[str, str]]:
    """(megatron name, suffix) pairs for a pre-norm: local ``input_layernorm.weight`` vs TE
    ``self_attention.linear_qkv.layer_norm_weight`` (and the fc1 counterpart)."""
    suffixes = ["weight", "bias"] if bias else ["weight"]
    if spec == "te":
        owner = "self_attention.linear_qkv" if which == "attn" else "mlp.linear_fc1"
        return [(f"{prefix}.{owner}.layer_norm_{s}", s) for s in suffixes]
    local = "input_layernorm" if which == "attn" else "pre_mlp_layernorm"
    return [(f"{prefix}.{local}.{s}", s) for s in suffixes]


def weight_map(cfg: ModelConfig, layout: str, spec: str = "local") -> list[TensorMap]:
    """The full table for one model: layout ``remote`` | ``native``, megatron spec ``local`` | ``te``."""
    if layout not in ("remote", "native"):
        raise ValueError(f"layout must be remote or native, got {layout!r}")
    v, lm = cfg.vision, cfg.language
    out: list[TensorMap] = []

    def add(mcore: str, *hf: str, transform: str = "copy", heads: int = 0, groups: int = 0) -> None:
        out.append(TensorMap(mcore, tuple(hf), transform, heads, groups))

    # --- vision tower
    if layout == "remote":
        e, L = "vision_model.embeddings", "vision_model.encoder.layers.{i}"
        add("vision_model.embeddings.class_embedding", f"{e}.class_embedding")
        add("vision_model.embeddings.position_embedding", f"{e}.position_embedding")
        for s in ("weight", "bias"):
            add(f"vision_model.embeddings.patch_embedding.{s}", f"{e}.patch_embedding.{s}")
        vit = {"norm1": "norm1", "norm2": "norm2", "qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1",
               "fc2": "mlp.fc2", "ls1": "ls1", "ls2": "ls2"}
    else:
        e, L = "model.vision_tower.embeddings", "model.vision_tower.encoder.layer.{i}"
        add("vision_model.embeddings.class_embedding", f"{e}.cls_token")
        add("vision_model.embeddings.position_embedding", f"{e}.position_embeddings")
        for s in ("weight", "bias"):
            add(f"vision_model.embeddings.patch_embedding.{s}", f"{e}.patch_embeddings.projection.{s}")
        vit = {"norm1": "layernorm_before", "norm2": "layernorm_after", "proj": "attention.projection_layer",
               "fc1": "mlp.fc1", "fc2": "mlp.fc2", "ls1": "lambda_1", "ls2": "lambda_2"}
    for i in range(v.num_layers):
        m, h = f"vision_model.decoder.layers.{i}", L.format(i=i)
        for name, s in _norm_names(m, "attn", spec, True):
            add(name, f"{h}.{vit['norm1']}.{s}")
        for name, s in _norm_names(m, "mlp", spec, True):
            add(name, f"{h}.{vit['norm2']}.{s}")
        for s in (("weight", "bias") if v.qkv_bias else ("weight",)):
            if layout == "remote":
                add(f"{m}.self_attention.linear_qkv.{s}", f"{h}.attn.qkv.{s}", transform="qkv_fused",
                    heads=v.num_attention_heads, groups=v.num_attention_heads)
            else:
                add(f"{m}.self_attention.linear_qkv.{s}", *(f"{h}.attention.{p}_proj.{s}" for p in "qkv"),
                    transform="qkv", heads=v.num_attention_heads, groups=v.num_attention_heads)
        for s in ("weight", "bias"):
            add(f"{m}.self_attention.linear_proj.{s}", f"{h}.{vit['proj']}.{s}")
            add(f"{m}.mlp.linear_fc1.{s}", f"{h}.{vit['fc1']}.{s}")
            add(f"{m}.mlp.linear_fc2.{s}", f"{h}.{vit['fc2']}.{s}")
        add(f"{m}.self_attn_bda.ls", f"{h}.{vit['ls1']}")
        add(f"{m}.mlp_bda.ls", f"{h}.{vit['ls2']}")

    # --- projector
    proj = (("mlp1.0", "mlp1.1", "mlp1.3") if layout == "remote" else
            ("model.multi_modal_projector.layer_norm", "model.multi_modal_projector.linear_1",
             "model.multi_modal_projector.linear_2"))
    for ours, theirs in zip(("projector.layer_norm", "projector.linear_1", "projector.linear_2"), proj):
        for s in ("weight", "bias"):
            add(f"{ours}.{s}", f"{theirs}.{s}")

    # --- language model
    nh, ng = lm.num_attention_heads, lm.num_query_groups
    if layout == "remote":
        root, head = "language_model.model", "language_model.output" if lm.arch == "internlm2" else "language_model.lm_head"
    else:
        root, head = "model.language_model", "lm_head"
    internlm2 = lm.arch == "internlm2"
    if internlm2 and layout == "native":
        raise HFCheckpointError("the transformers-native InternVL layout has no InternLM2 language model")
    add("language_model.embedding.word_embeddings.weight",
        f"{root}.tok_embeddings.weight" if internlm2 else f"{root}.embed_tokens.weight")
    for i in range(lm.num_layers):
        m, h = f"language_model.decoder.layers.{i}", f"{root}.layers.{i}"
        (an, _), = _norm_names(m, "attn", spec, False)
        (fn, _), = _norm_names(m, "mlp", spec, False)
        if internlm2:
            add(an, f"{h}.attention_norm.weight")
            add(fn, f"{h}.ffn_norm.weight")
            # InternLM2's wqkv rows are already grouped per KV head [q...; k; v]: megatron's order.
            add(f"{m}.self_attention.linear_qkv.weight", f"{h}.attention.wqkv.weight")
            add(f"{m}.self_attention.linear_proj.weight", f"{h}.attention.wo.weight")
            add(f"{m}.mlp.linear_fc1.weight", f"{h}.feed_forward.w1.weight", f"{h}.feed_forward.w3.weight",
                transform="cat")
            add(f"{m}.mlp.linear_fc2.weight", f"{h}.feed_forward.w2.weight")
        else:
            add(an, f"{h}.input_layernorm.weight")
            add(fn, f"{h}.post_attention_layernorm.weight")
            for s in (("weight", "bias") if lm.qkv_bias else ("weight",)):
                add(f"{m}.self_attention.linear_qkv.{s}", *(f"{h}.self_attn.{p}_proj.{s}" for p in "qkv"),
                    transform="qkv", heads=nh, groups=ng)
            add(f"{m}.self_attention.linear_proj.weight", f"{h}.self_attn.o_proj.weight")
            add(f"{m}.mlp.linear_fc1.weight", f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight",
                transform="cat")
            add(f"{m}.mlp.linear_fc2.weight", f"{h}.mlp.down_proj.weight")
    add("language_model.decoder.final_layernorm.weight", f"{root}.norm.weight")
    if not lm.tie_word_embeddings:
        add("language_model.output_layer.weight", f"{head}.weight")
    return out


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
def special_token_ids(hf_dir: str | os.PathLike) -> dict[str, int]:
    """content -> id of the added tokens in tokenizer_config.json / added_tokens.json / tokenizer.json."""
    d = Path(hf_dir)
    ids: dict[str, int] = {}
    tj = d / "tokenizer.json"
    if tj.is_file():
        for t in json.loads(tj.read_text()).get("added_tokens", []):
            ids.setdefault(t["content"], int(t["id"]))
    at = d / "added_tokens.json"
    if at.is_file():
        for k, v in json.loads(at.read_text()).items():
            ids.setdefault(k, int(v))
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        for k, v in (json.loads(tc.read_text()).get("added_tokens_decoder") or {}).items():
            ids.setdefault(v["content"] if isinstance(v, dict) else str(v), int(k))
    return ids


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------
def read_safetensors(hf_dir: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``."""
    from safetensors.torch import load_file

    d = Path(hf_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise HFCheckpointError(f"{d}: no model.safetensors or model.safetensors.index.json")
    out: dict[str, Tensor] = {}
    for f in files:
        if not (d / f).is_file():
            raise HFCheckpointError(f"{d}: shard {f} named in the index is missing")
        out.update(load_file(str(d / f)))
    return out


# transformers writes InternVLForConditionalGeneration with the pre-v5 key layout (``vision_tower.*``,
# ``language_model.model.*``, ``language_model.lm_head``); its runtime names (and our table) are
# ``model.vision_tower.*``, ``model.language_model.*``, ``lm_head``.
_NATIVE_SAVED_PREFIXES = (("vision_tower.", "model.vision_tower."),
                          ("multi_modal_projector.", "model.multi_modal_projector."),
                          ("language_model.model.", "model.language_model."),
                          ("language_model.lm_head.", "lm_head."))


def canonical_native_names(hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """Native-layout tensors under the runtime names, whichever of the two key layouts was saved."""
    out = {}
    for k, t in hf.items():
        for old, new in _NATIVE_SAVED_PREFIXES:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        if k in out:
            raise HFCheckpointError(f"HF tensor {k} appears under both key layouts")
        out[k] = t
    return out


def hf_to_megatron(table: list[TensorMap], hf: dict[str, Tensor],
                   expected: Optional[dict[str, tuple[int, ...]]] = None) -> dict[str, Tensor]:
    """Apply the table. Missing and unused HF tensors are errors that name them; with ``expected``
    (megatron name -> shape), each HF tensor's shape is checked first, against the inverse transform
    of the megatron shape, so a mismatch names the HF tensor itself."""
    used: set[str] = set()
    out: dict[str, Tensor] = {}
    for tm in table:
        missing = [n for n in tm.hf if n not in hf]
        if missing:
            raise HFCheckpointError(f"HF tensor {missing[0]} (for {tm.mcore}) is missing from the checkpoint")
        if expected is not None:
            if tm.mcore not in expected:
                raise HFCheckpointError(f"table entry {tm.mcore} has no megatron parameter")
            want = [tuple(t.shape) for t in tm.to_hf(torch.empty(expected[tm.mcore], device="meta"))]
            for n, w in zip(tm.hf, want):
                if tuple(hf[n].shape) != w:
                    raise HFCheckpointError(f"HF tensor {n} has shape {tuple(hf[n].shape)}, but config.json "
                                            f"implies {w}")
        out[tm.mcore] = tm.to_megatron([hf[n] for n in tm.hf])
        used.update(tm.hf)
    extra = sorted(set(hf) - used)
    if extra:
        raise HFCheckpointError(f"unexpected HF tensor {extra[0]} ({len(extra)} unused in all); the config does "
                                f"not describe this checkpoint")
    return out


def megatron_to_hf(table: list[TensorMap], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`hf_to_megatron` (for export)."""
    out: dict[str, Tensor] = {}
    for tm in table:
        if tm.mcore not in state:
            raise HFCheckpointError(f"megatron tensor {tm.mcore} is missing")
        for name, t in zip(tm.hf, tm.to_hf(state[tm.mcore])):
            out[name] = t.contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def _ensure_single_rank(stack: contextlib.ExitStack) -> None:
    from megatron.core import parallel_state as ps

    from v2pe_megatron.runtime.distributed import model_parallel

    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
            raise RuntimeError("hf.load builds a whole model in this process: it needs tp=1 and pp=1 "
                               "(or no model-parallel state at all); convert to a torch_dist checkpoint instead")
        return
    stack.enter_context(model_parallel(1, 1))


def load(hf_dir: str | os.PathLike, *, img_context_token_id: Optional[int] = None, dtype: str = "fp32",
         spec: str = "auto"):
    """The InternVL model of an HF checkpoint directory, in eval mode, in this process.

    ``img_context_token_id``: overrides the id read from the tokenizer files (``<IMG_CONTEXT>``) or
    from ``config.json`` (``image_token_id``). Sets up a 1-rank process group and megatron state if
    none exists; they stay alive with the model (``model._hf_stack``).
    """
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import Layout, resolve_spec
    from v2pe_megatron.runtime.distributed import device

    d = Path(hf_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise HFCheckpointError(f"{d}: config.json not found")
    mc, layout = model_config_from_hf(json.loads(cfg_path.read_text()))
    toks = special_token_ids(d)
    if img_context_token_id is not None:
        mc.img_context_token_id = int(img_context_token_id)
    elif "<IMG_CONTEXT>" in toks:
        mc.img_context_token_id = toks["<IMG_CONTEXT>"]
    elif layout == "remote" or "image_token_id" not in json.loads(cfg_path.read_text()):
        raise HFCheckpointError(f"{d}: no <IMG_CONTEXT> token in the tokenizer files; pass img_context_token_id")
    if "<img>" in toks:
        mc.img_start_token_id = toks["<img>"]
    if "</img>" in toks:
        mc.img_end_token_id = toks["</img>"]
    mc.dtype = dtype
    mc.spec = resolve_spec(spec)

    hf = read_safetensors(d)
    if layout == "native":
        hf = canonical_native_names(hf)
    table = weight_map(mc, layout, mc.spec)

    stack = contextlib.ExitStack()
    _ensure_single_rank(stack)
    try:
        model = build_model(mc, Layout(spec=mc.spec), pre_process=True, post_process=True)
        own = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        state = hf_to_megatron(table, hf, own)
        unfilled = sorted(set(own) - set(state))
        if unfilled:
            raise HFCheckpointError(f"megatron parameter {unfilled[0]} has no HF tensor in the table")
    except BaseException:
        stack.close()
        raise
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, t in state.items():
            params[k].copy_(t.to(params[k].dtype))
    model.to(device())
    model.eval()
    model._hf_stack = stack  # keeps the 1-rank process group alive as long as the model
    model.hf_layout = layout
    return model
