"""A tiny language model and synthetic batches, shared by the parity tests and the demo.

Everything runs inside a rank that already has megatron's model-parallel state (see
``runtime.distributed.model_parallel``).
"""

from __future__ import annotations

from typing import Iterator

import torch
from megatron.core import parallel_state as ps

from v2pe_megatron.config import Recipe, load_recipe
from v2pe_megatron.model.language import LanguageModel, language_transformer_config
from v2pe_megatron.model.specs import block_spec, layer_spec, resolve_spec
from v2pe_megatron.model.transformer_config import DTYPES
from v2pe_megatron.runtime.distributed import device
from v2pe_megatron.training.engine import masked_loss_func


def tiny_recipe(*overrides: str) -> Recipe:
    base = ["model.preset=tiny", "data.image_size=56", "data.seq_length=32", "optimizer.clip_grad=0",
            "optimizer.weight_decay=0"]
    return load_recipe(None, base + list(overrides))


def build_language_model(recipe: Recipe) -> LanguageModel:
    """The recipe's LLM for this rank's pipeline stage, with per-token loss averaging."""
    lm = recipe.model.language
    cfg = language_transformer_config(lm, recipe.parallel, dtype=recipe.model.dtype, recompute=recipe.train.recompute)
    cfg.calculate_per_token_loss = True
    spec = resolve_spec(recipe.model.spec)
    layers = block_spec(spec, cfg, layer_spec(spec))
    model = LanguageModel(cfg, layers, vocab_size=lm.vocab_size, max_sequence_length=lm.max_position_embeddings,
                          rotary_base=lm.rotary_base, pre_process=ps.is_pipeline_first_stage(ignore_virtual=True),
                          post_process=ps.is_pipeline_last_stage(ignore_virtual=True))
    return model.to(device=device(), dtype=DTYPES[recipe.model.dtype])


def synthetic_lm_batches(num: int, *, micro_batch_size: int, seq_length: int, vocab_size: int,
                         seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``num`` micro-batches of random tokens with next-token labels, a partial loss mask and
    fractional (V2PE-like) positions, so that every code path that sees positions is exercised."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        toks = torch.randint(0, vocab_size, (micro_batch_size, seq_length + 1), generator=g)
        mask = (torch.rand(micro_batch_size, seq_length, generator=g) > 0.25).float()
        steps = torch.where(torch.rand(micro_batch_size, seq_length, generator=g) > 0.5, 1.0, 0.25)
        pos = (torch.cumsum(steps.double(), dim=1) - steps.double())
        out.append({"tokens": toks[:, :-1], "labels": toks[:, 1:], "loss_mask": mask, "position_ids": pos})
    return out


def shard_for_data_parallel(batches: list[dict], dp_rank: int, dp_size: int) -> list[dict]:
    """The global batch is ``batches`` (micro-batches in order); rank r takes every dp_size-th."""
    return batches[dp_rank::dp_size]


def lm_forward_step(data_iterator: Iterator[dict], model):
    batch = next(data_iterator)
    dev = next(model.parameters()).device
    out = model(batch["tokens"].to(dev), batch["position_ids"].to(dev), labels=batch["labels"].to(dev))
    return out, masked_loss_func(batch["loss_mask"].to(dev))
