"""The projector (HF's ``mlp1``): pixel shuffle + LayerNorm + Linear + GELU + Linear.

Tensor parallel as a megatron MLP: ``linear_1`` column-parallel (each rank a slice of the LLM
hidden size), GELU on the slice, ``linear_2`` row-parallel (all-reduced, bias added once). The
LayerNorm is replicated. The output is the whole [T, n, H] on every TP rank, ready to be merged into
the LLM's full-sequence embeddings before their sequence-parallel scatter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


def pixel_shuffle(x: Tensor, scale_factor: float = 0.5) -> Tensor:
    """InternVL's pixel shuffle, "v2" order: [n, w, h, c] -> [n, w*s, h*s, c/s^2].

    The same view/permute sequence as InternVL's ``pixel_shuffle`` (ps_version v2) and transformers'
    ``InternVLModel.pixel_shuffle``: the channel order of the merged 2x2 neighbourhoods is what the
    trained ``mlp1`` weights expect, so it must not be replaced by ``F.pixel_unshuffle``.
    """
    n, w, h, c = x.shape
    hs, ws, cs = int(h * scale_factor), int(w * scale_factor), int(c / scale_factor)
    if hs / scale_factor != h or ws / scale_factor != w:
        raise ValueError(f"pixel shuffle: feature grid {w}x{h} is not divisible by 1/{scale_factor}")
    x = x.reshape(n, w, hs, cs).permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, hs, ws, int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()


class Projector(MegatronModule):
    """[T, N, C] ViT features -> [T, N * r^2, H] LLM embeddings (r = downsample ratio)."""

    def __init__(self, config: TransformerConfig, vision_hidden: int, llm_hidden: int, *,
                 downsample_ratio: float = 0.5, layernorm_eps: float = 1e-5):
        super().__init__(config=config)
        self.downsample_ratio = downsample_ratio
        inner = int(round(vision_hidden / downsample_ratio**2))
        self.layer_norm = torch.nn.LayerNorm(inner, eps=layernorm_eps, dtype=config.params_dtype)
        self.linear_1 = tensor_parallel.ColumnParallelLinear(
            inner, llm_hidden, config=config, init_method=config.init_method, bias=True, gather_output=False,
            skip_bias_add=False)
        self.linear_2 = tensor_parallel.RowParallelLinear(
            llm_hidden, llm_hidden, config=config, init_method=config.output_layer_init_method, bias=True,
            input_is_parallel=True, skip_bias_add=False)

    def forward(self, features: Tensor) -> Tensor:
        t, n, c = features.shape
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"projector: {n} patch features per tile do not form a square grid")
        x = pixel_shuffle(features.reshape(t, side, side, c), self.downsample_ratio)
        x = x.reshape(t, -1, x.shape[-1])
        x = self.layer_norm(x)
        x, _ = self.linear_1(x)
        x = F.gelu(x)
        x, _ = self.linear_2(x)
        return x
