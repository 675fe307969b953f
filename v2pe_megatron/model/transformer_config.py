"""What the vision tower and the LLM share in their megatron ``TransformerConfig``.

Fusions that assume arange positions or need CUDA kernels stay off on every path: V2PE frequencies
are per token (no fused RoPE), and the local spec runs on CPU (no bias/softmax/gradient fusions).
Transformer Engine modules bring their own fused kernels regardless of these flags.
"""

from __future__ import annotations

from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def shared_kwargs(*, dtype: str, recompute: str, init_std: float) -> dict[str, Any]:
    torch_dtype = DTYPES[dtype]
    kwargs: dict[str, Any] = dict(
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        init_method_std=init_std,
        params_dtype=torch_dtype,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        pipeline_dtype=torch_dtype,
    )
    if recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    return kwargs
