"""InternViT from megatron-core parts: a ``TransformerBlock`` with a ViT layer spec.

The ViT layer is megatron's ``TransformerLayer`` (pre-LayerNorm, qkv bias, exact-GELU MLP with
biases, no attention mask). InternViT's learned layer scale and drop path live in the layer's
bias-dropout-add slots: ``TransformerLayer`` calls ``self_attn_bda(training, fused)(out_with_bias,
residual, p)`` and adds the residual there, which is exactly where ``residual + drop_path(ls * out)``
belongs, so no megatron code is forked.

The tower keeps its own ``TransformerConfig``: tensor parallel like the LLM, but never sequence
parallel (a few hundred tokens per tile, and the features must be whole to be merged into the LLM
sequence before its own scatter) and never context parallel.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from v2pe_megatron.config import VisionConfig
from v2pe_megatron.model.attention import SDPACoreAttention
from v2pe_megatron.model.specs import layer_spec
from v2pe_megatron.model.transformer_config import shared_kwargs
from v2pe_megatron.parallel.layout import Layout

def vision_transformer_config(v: VisionConfig, layout: Layout, *, dtype: str = "fp32",
                              recompute: str = "none", init_std: float = 0.02) -> TransformerConfig:
    """megatron ``TransformerConfig`` for InternViT: TP from the layout, SP/CP/PP off."""
    if v.qk_normalization:
        # InternViT-6B normalizes q/k over all heads at once; megatron's q/k norm is per head.
        raise NotImplementedError("model.vision.qk_normalization=true (InternViT-6B) is not supported")
    if v.select_layer != -1:
        raise NotImplementedError(f"model.vision.select_layer={v.select_layer}: only -1 (last layer) is supported")
    return TransformerConfig(
        num_layers=v.num_layers,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_attention_heads,
        num_query_groups=v.num_attention_heads,
        ffn_hidden_size=v.ffn_hidden_size,
        kv_channels=v.hidden_size // v.num_attention_heads,
        normalization="LayerNorm",
        layernorm_epsilon=v.layernorm_eps,
        gated_linear_unit=False,
        activation_func=F.gelu,  # exact (erf) GELU, as InternViT
        add_bias_linear=True,
        add_qkv_bias=v.qkv_bias,
        bias_activation_fusion=False,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=1,
        context_parallel_size=1,
        sequence_parallel=False,
        **shared_kwargs(dtype=dtype, recompute=recompute, init_std=init_std),
    )


class VisionCoreAttention(SDPACoreAttention):
    """SDPA attention that never takes the context-parallel path: each tile is attended whole."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cp_size = 1


class LayerScaleBDA(torch.nn.Module):
    """Bias + learned layer scale + drop path + residual, in megatron's bias-dropout-add slot.

    ``forward(training, fused)`` returns ``f((x, bias), residual, dropout_p) = residual +
    drop_path(ls * (x + bias))``. ``dropout_p`` is megatron's hidden dropout, always 0 for the ViT.
    Drop path draws one keep/drop per tile from torch's default generator, which megatron seeds alike
    on all tensor-parallel ranks, so the replicated activations stay identical across TP ranks.
    """

    def __init__(self, hidden_size: int, init_value: float = 0.1, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.init_value = float(init_value)  # training/init_weights.py starts ``ls`` from it too
        self.ls = torch.nn.Parameter(torch.full((hidden_size,), self.init_value, dtype=dtype))
        self.drop_prob = 0.0

    def forward(self, training: bool, fused: bool) -> Callable:
        del fused  # nothing to fuse on this path

        def bda(x_with_bias, residual: Tensor, prob: float) -> Tensor:
            x, bias = x_with_bias
            if bias is not None:
                x = x + bias
            x = x * self.ls
            if training and prob > 0:
                x = F.dropout(x, p=prob, training=True)
            if training and self.drop_prob > 0:
                keep = 1.0 - self.drop_prob
                # x: [s, b, h]; one draw per sample (tile)
                mask = torch.empty((1, x.shape[1], 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
                x = x * mask / keep
            return residual + x

        return bda


def vit_layer_spec(spec: str, v: VisionConfig, dtype: torch.dtype) -> ModuleSpec:
    """The LLM's layer spec (local or TE) with no mask, our bda slots, and CP-free core attention."""
    base = layer_spec(spec, mask_type=AttnMaskType.no_mask,
                      core_attention=VisionCoreAttention if spec == "local" else None)
    bda = ModuleSpec(module=LayerScaleBDA, params={"hidden_size": v.hidden_size,
                                                   "init_value": v.layer_scale_init, "dtype": dtype})
    subs = dataclasses.replace(base.submodules, self_attn_bda=bda, mlp_bda=bda)
    return ModuleSpec(module=base.module, params=dict(base.params or {}), submodules=subs)


class VisionEmbeddings(torch.nn.Module):
    """Patch conv + CLS + learned absolute positions (bicubic-resized for other image sizes)."""

    init_std = 0.02  # CLS and position embeddings: normal(0, init_std), here and in training/init_weights.py

    def __init__(self, v: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.image_size, self.patch_size = v.image_size, v.patch_size
        side = v.image_size // v.patch_size
        self.class_embedding = torch.nn.Parameter(torch.randn(1, 1, v.hidden_size, dtype=dtype)
                                                  * self.init_std)
        self.patch_embedding = torch.nn.Conv2d(v.num_channels, v.hidden_size, kernel_size=v.patch_size,
                                               stride=v.patch_size, dtype=dtype)
        self.position_embedding = torch.nn.Parameter(torch.randn(1, side * side + 1, v.hidden_size, dtype=dtype)
                                                     * self.init_std)

    def _patch_positions(self, h: int, w: int) -> Tensor:
        pos = self.position_embedding[:, 1:]
        side = self.image_size // self.patch_size
        if (h, w) == (side, side):
            return pos
        grid = pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, h * w).permute(0, 2, 1).to(pos.dtype)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """[T, 3, H, W] -> [T, 1 + (H/p)(W/p), C]."""
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        t, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(t, 1, -1), x], dim=1)
        pos = torch.cat([self.position_embedding[:, :1], self._patch_positions(h, w)], dim=1)
        return x + pos


class InternViT(MegatronModule):
    """pixel_values [T, 3, H, W] -> patch features [T, (H/p)(W/p), C] (last layer, CLS dropped)."""

    def __init__(self, config: TransformerConfig, v: VisionConfig, *, spec: str = "local"):
        super().__init__(config=config)
        self.embeddings = VisionEmbeddings(v, config.params_dtype)
        layer = vit_layer_spec(spec, v, config.params_dtype)
        # No final norm: InternVL takes the last layer's output as is.
        self.decoder = TransformerBlock(
            config=config, spec=TransformerBlockSubmodules(layer_specs=[layer] * v.num_layers, layer_norm=None),
            pre_process=True, post_process=False)
        rates = torch.linspace(0, v.drop_path_rate, v.num_layers, device="cpu").tolist() if v.num_layers > 1 else [0.0]
        for layer_module, rate in zip(self.decoder.layers, rates):
            layer_module.self_attn_bda.drop_prob = rate
            layer_module.mlp_bda.drop_prob = rate

    def set_input_tensor(self, input_tensor) -> None:  # the tower is never split across stages
        pass

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.embeddings(pixel_values)                    # [T, N+1, C]
        x = self.decoder(hidden_states=x.transpose(0, 1).contiguous(), attention_mask=None)
        return x.transpose(0, 1)[:, 1:]                      # [T, N, C]

