"""Typed HF <-> megatron tensor mappings, one small class per transform.

A mapping names one megatron parameter and the HF tensor(s) it is made of, with ``{layer}`` in
both names for per-layer entries; :func:`weight_map` expands the patterns into the full table for a
model. Every mapping works in both directions (``to_megatron`` / ``to_hf``) and is exact: the
transforms only reorder or concatenate rows, so HF -> megatron -> HF is bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
import torch
from torch import Tensor

from v2pe_megatron.config import ModelConfig
from v2pe_megatron.convert.errors import HFCheckpointError


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
class Mapping:
    """megatron ``mcore`` <-> HF ``hf`` tensors; ``{layer}`` in the names until :meth:`at` fills it."""

    mcore: str
    hf: tuple[str, ...]

    def at(self, layer: int) -> "Mapping":
        return replace(self, mcore=self.mcore.format(layer=layer), hf=tuple(h.format(layer=layer) for h in self.hf))

    def to_megatron(self, ts: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def to_hf(self, t: Tensor) -> list[Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class Copy(Mapping):
    """One tensor, same layout (InternLM2's ``wqkv`` too: its rows are already megatron's per-group order)."""

    def to_megatron(self, ts: list[Tensor]) -> Tensor:
        return ts[0]

    def to_hf(self, t: Tensor) -> list[Tensor]:
        return [t]


@dataclass(frozen=True)
class GroupedQKV(Mapping):
    """HF (q, k, v) -> megatron's fused rows per KV group [q heads of the group; k; v]."""

    heads: int = 0
    groups: int = 0

    def to_megatron(self, ts: list[Tensor]) -> Tensor:
        return qkv_to_megatron(*ts, self.heads, self.groups)

    def to_hf(self, t: Tensor) -> list[Tensor]:
        return list(qkv_from_megatron(t, self.heads, self.groups))


@dataclass(frozen=True)
class FusedQKV(Mapping):
    """InternViT's one ``attn.qkv`` [all q; all k; all v] -> megatron's per-head [q_h; k_h; v_h] rows."""

    heads: int = 0

    def to_megatron(self, ts: list[Tensor]) -> Tensor:
        q, k, v = torch.chunk(ts[0], 3, dim=0)
        return qkv_to_megatron(q, k, v, self.heads, self.heads)

    def to_hf(self, t: Tensor) -> list[Tensor]:
        return [torch.cat(qkv_from_megatron(t, self.heads, self.heads), dim=0)]


@dataclass(frozen=True)
class GatedMLP(Mapping):
    """HF gate and up projections -> megatron's ``linear_fc1`` = [gate; up] (split per TP rank by the caller)."""


    def to_megatron(self, ts: list[Tensor]) -> Tensor:
        return torch.cat(ts, dim=0)

    def to_hf(self, t: Tensor) -> list[Tensor]:
        return list(torch.chunk(t, len(self.hf), dim=0))


def _norm_names(prefix: str, which: str, bias: bool) -> list[tuple[str, str]]:
    """(megatron name, suffix) pairs for a pre-norm, under the one checkpoint name both specs use
    (Transformer Engine's: ``self_attention.linear_qkv.layer_norm_weight`` and the fc1 counterpart;
    ``model.checkpoint_names``)."""
    owner = "self_attention.linear_qkv" if which == "attn" else "mlp.linear_fc1"
    return [(f"{prefix}.{owner}.layer_norm_{s}", s) for s in (["weight", "bias"] if bias else ["weight"])]


def _vision(cfg: ModelConfig, layout: str) -> tuple[list[Mapping], list[Mapping]]:
    """(once, per layer) mappings of InternViT."""
    v = cfg.vision
    if layout == "remote":
        e, h = "vision_model.embeddings", "vision_model.encoder.layers.{layer}"
        once: list[Mapping] = [Copy("vision_model.embeddings.class_embedding", (f"{e}.class_embedding",)),
                               Copy("vision_model.embeddings.position_embedding", (f"{e}.position_embedding",))]
        once += [Copy(f"vision_model.embeddings.patch_embedding.{s}", (f"{e}.patch_embedding.{s}",))
                 for s in ("weight", "bias")]
        n = {"norm1": "norm1", "norm2": "norm2", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
             "ls1": "ls1", "ls2": "ls2"}
    else:
        e, h = "model.vision_tower.embeddings", "model.vision_tower.encoder.layer.{layer}"
        once = [Copy("vision_model.embeddings.class_embedding", (f"{e}.cls_token",)),
                Copy("vision_model.embeddings.position_embedding", (f"{e}.position_embeddings",))]
        once += [Copy(f"vision_model.embeddings.patch_embedding.{s}", (f"{e}.patch_embeddings.projection.{s}",))
                 for s in ("weight", "bias")]
        n = {"norm1": "layernorm_before", "norm2": "layernorm_after", "proj": "attention.projection_layer",
             "fc1": "mlp.fc1", "fc2": "mlp.fc2", "ls1": "lambda_1", "ls2": "lambda_2"}
    m = "vision_model.decoder.layers.{layer}"
    per: list[Mapping] = []
    per += [Copy(name, (f"{h}.{n['norm1']}.{s}",)) for name, s in _norm_names(m, "attn", True)]
    per += [Copy(name, (f"{h}.{n['norm2']}.{s}",)) for name, s in _norm_names(m, "mlp", True)]
    for s in (("weight", "bias") if v.qkv_bias else ("weight",)):
        if layout == "remote":
            per.append(FusedQKV(f"{m}.self_attention.linear_qkv.{s}", (f"{h}.attn.qkv.{s}",),
                                heads=v.num_attention_heads))
        else:
            per.append(GroupedQKV(f"{m}.self_attention.linear_qkv.{s}",
                                  tuple(f"{h}.attention.{p}_proj.{s}" for p in "qkv"),
                                  heads=v.num_attention_heads, groups=v.num_attention_heads))
    for s in ("weight", "bias"):
        per += [Copy(f"{m}.self_attention.linear_proj.{s}", (f"{h}.{n['proj']}.{s}",)),
                Copy(f"{m}.mlp.linear_fc1.{s}", (f"{h}.{n['fc1']}.{s}",)),
                Copy(f"{m}.mlp.linear_fc2.{s}", (f"{h}.{n['fc2']}.{s}",))]
    per += [Copy(f"{m}.self_attn_bda.ls", (f"{h}.{n['ls1']}",)), Copy(f"{m}.mlp_bda.ls", (f"{h}.{n['ls2']}",))]
    return once, per


def _projector(layout: str) -> list[Mapping]:
    theirs = (("mlp1.0", "mlp1.1", "mlp1.3") if layout == "remote" else
              ("model.multi_modal_projector.layer_norm", "model.multi_modal_projector.linear_1",
               "model.multi_modal_projector.linear_2"))
    return [Copy(f"{ours}.{s}", (f"{t}.{s}",))
            for ours, t in zip(("projector.layer_norm", "projector.linear_1", "projector.linear_2"), theirs)
            for s in ("weight", "bias")]


def _language(cfg: ModelConfig, layout: str) -> tuple[list[Mapping], list[Mapping], list[Mapping]]:
    """(embedding, per layer, final norm + output) mappings of the LLM."""
    lm = cfg.language
    internlm2 = lm.arch == "internlm2"
    if internlm2 and layout == "native":
        raise HFCheckpointError("the transformers-native InternVL layout has no InternLM2 language model; "
                                "export an InternLM2 model with --layout remote-code")
    if layout == "remote":
        root = "language_model.model"
        head = "language_model.output" if internlm2 else "language_model.lm_head"
    else:
        root, head = "model.language_model", "lm_head"
    first = [Copy("language_model.embedding.word_embeddings.weight",
                  (f"{root}.tok_embeddings.weight" if internlm2 else f"{root}.embed_tokens.weight",))]
    m, h = "language_model.decoder.layers.{layer}", f"{root}.layers.{{layer}}"
    (an, _), = _norm_names(m, "attn", False)
    (fn, _), = _norm_names(m, "mlp", False)
    if internlm2:
        per: list[Mapping] = [
            Copy(an, (f"{h}.attention_norm.weight",)), Copy(fn, (f"{h}.ffn_norm.weight",)),
            Copy(f"{m}.self_attention.linear_qkv.weight", (f"{h}.attention.wqkv.weight",)),
            Copy(f"{m}.self_attention.linear_proj.weight", (f"{h}.attention.wo.weight",)),
            GatedMLP(f"{m}.mlp.linear_fc1.weight", (f"{h}.feed_forward.w1.weight", f"{h}.feed_forward.w3.weight")),
            Copy(f"{m}.mlp.linear_fc2.weight", (f"{h}.feed_forward.w2.weight",))]
    else:
        per = [Copy(an, (f"{h}.input_layernorm.weight",)), Copy(fn, (f"{h}.post_attention_layernorm.weight",))]
        per += [GroupedQKV(f"{m}.self_attention.linear_qkv.{s}", tuple(f"{h}.self_attn.{p}_proj.{s}" for p in "qkv"),
                           heads=lm.num_attention_heads, groups=lm.num_query_groups)
                for s in (("weight", "bias") if lm.qkv_bias else ("weight",))]
        per += [Copy(f"{m}.self_attention.linear_proj.weight", (f"{h}.self_attn.o_proj.weight",)),
                GatedMLP(f"{m}.mlp.linear_fc1.weight", (f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight")),
                Copy(f"{m}.mlp.linear_fc2.weight", (f"{h}.mlp.down_proj.weight",))]
    last = [Copy("language_model.decoder.final_layernorm.weight", (f"{root}.norm.weight",))]
    if not lm.tie_word_embeddings:
        last.append(Copy("language_model.output_layer.weight", (f"{head}.weight",)))
    return first, per, last


def weight_map(cfg: ModelConfig, layout: str) -> list[Mapping]:
    """The full table for one model, in file order (vision, projector, LLM layer by layer), HF
    ``layout`` ``remote`` | ``native``. The megatron side is named as in a checkpoint, the same for
    both layer specs; a model's own parameter names map onto it with
    :func:`v2pe_megatron.model.checkpoint_names.checkpoint_name`."""
    if layout not in ("remote", "native"):
        raise ValueError(f"layout must be remote or native, got {layout!r}")
    v_once, v_per = _vision(cfg, layout)
    first, l_per, last = _language(cfg, layout)
    out = list(v_once)
    out += [mp.at(i) for i in range(cfg.vision.num_layers) for mp in v_per]
    out += _projector(layout)
    out += first
    out += [mp.at(i) for i in range(cfg.language.num_layers) for mp in l_per]
    return out + last


# Back-compatible name: the table's entries were called TensorMap before the classes existed.
TensorMap = Mapping


def hf_shapes(mp: Mapping, mcore_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The HF tensor shapes that make a megatron tensor of ``mcore_shape`` (computed on meta tensors)."""
    return [tuple(t.shape) for t in mp.to_hf(torch.empty(mcore_shape, device="meta"))]


def check_hf_shapes(mp: Mapping, got: list[tuple[int, ...]], mcore_shape: tuple[int, ...]) -> None:
    for n, g, w in zip(mp.hf, got, hf_shapes(mp, mcore_shape)):
        if tuple(g) != w:
            raise HFCheckpointError(f"HF tensor {n} has shape {tuple(g)}, but config.json implies {w} "
                                    f"(for {mp.mcore}); the config does not describe this checkpoint")


def nonfinite(t: Tensor) -> str | None:
    """How many NaN and Inf entries ``t`` holds (``"1 NaN and 2 Inf values of 4096"``), or None.
    NaN and Inf alike: a weight that is either poisons every activation it touches. The common,
    finite case costs two reductions and no tensor-sized temporary (max and min propagate NaN)."""
    if not t.is_floating_point() or t.numel() == 0:
        return None
    if bool(torch.isfinite(t.amax())) and bool(torch.isfinite(t.amin())):
        return None
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    parts = [f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n]
    return f"{' and '.join(parts)} value{'s' if nan + inf > 1 else ''} of {t.numel()}"


def hf_to_megatron(table: list[Mapping], hf: dict[str, Tensor],
                   expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, Tensor]:
    """Apply the table to in-memory tensors. Missing and unused HF tensors are errors that name them;
    with ``expected`` (megatron name -> shape), each HF tensor's shape is checked first, so a mismatch
    names the HF tensor itself."""
    used: set[str] = set()
    out: dict[str, Tensor] = {}
    for mp in table:
        missing = [n for n in mp.hf if n not in hf]
        if missing:
            raise HFCheckpointError(f"HF tensor {missing[0]} (for {mp.mcore}) is missing from the checkpoint")
        if expected is not None:
            if mp.mcore not in expected:
                raise HFCheckpointError(f"table entry {mp.mcore} has no megatron parameter")
            check_hf_shapes(mp, [tuple(hf[n].shape) for n in mp.hf], expected[mp.mcore])
        for n in mp.hf:
            bad = nonfinite(hf[n])
            if bad:
                raise HFCheckpointError(f"HF tensor {n} (for {mp.mcore}) holds {bad}: the checkpoint's weights "
                                        f"are not finite; use an intact copy of the checkpoint")
        out[mp.mcore] = mp.to_megatron([hf[n] for n in mp.hf])
        used.update(mp.hf)
    extra = sorted(set(hf) - used)
    if extra:
        raise HFCheckpointError(f"unexpected HF tensor {extra[0]} ({len(extra)} unused in all); the config does "
                                f"not describe this checkpoint")
    return out


def megatron_to_hf(table: list[Mapping], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`hf_to_megatron`."""
    out: dict[str, Tensor] = {}
    for mp in table:
        if mp.mcore not in state:
            raise HFCheckpointError(f"megatron tensor {mp.mcore} is missing")
        for name, t in zip(mp.hf, mp.to_hf(state[mp.mcore])):
            out[name] = t.contiguous()
    return out
