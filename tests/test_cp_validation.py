"""Invalid context-parallel layouts fail before training, with a message that says what to change."""

from __future__ import annotations

import pytest
import torch

from v2pe_megatron.config import RecipeError, load_recipe
from v2pe_megatron.packed_seq import packed_seq_params, split_batch_for_cp

BASE = ["model.preset=tiny", "data.image_size=56"]


def _recipe(*overrides: str):
    return load_recipe(None, BASE + list(overrides))


@pytest.mark.parametrize("overrides, fragment", [
    (["parallel.cp=2", "data.seq_length=30"], "divisible by 2*cp = 4; use e.g. seq_length=32"),
    (["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_length=36"],
     "2*cp*tp (sequence parallel) = 8"),
    # tiny: 2 KV heads; a2a degree 4 exceeds them
    (["parallel.cp=4", "parallel.cp_comm_type=a2a", "model.spec=te", "data.seq_length=64"], "exceeds or does not divide"),
    (["parallel.cp=4", "parallel.cp_comm_type=a2a+p2p", "parallel.hierarchical_cp_sizes=[4,2]", "model.spec=te",
      "data.seq_length=64"], "hierarchical_cp_sizes=[a2a, p2p] with product cp=4"),
    (["parallel.cp=2", "parallel.cp_comm_type=a2a", "model.spec=local", "data.seq_length=64"], "set cp_comm_type=p2p"),
    (["parallel.cp=2", "parallel.hierarchical_cp_sizes=[1,2]", "data.seq_length=64"], "only used by"),
])
def test_recipe_validation(overrides, fragment):
    with pytest.raises(RecipeError, match=None) as e:
        _recipe(*overrides)
    assert fragment in str(e.value), str(e.value)


def test_valid_layouts_pass():
    _recipe("parallel.cp=2", "data.seq_length=64")
    _recipe("parallel.cp=2", "parallel.cp_comm_type=a2a", "model.spec=te", "data.seq_length=64")
    _recipe("parallel.cp=4", "parallel.cp_comm_type=a2a+p2p", "parallel.hierarchical_cp_sizes=[2,2]",
            "model.spec=te", "data.seq_length=64")


def test_sub_samples_must_split_into_2cp_chunks():
    batch = {"tokens": torch.zeros(1, 24, dtype=torch.long), "seq_lens": [torch.tensor([10, 14])]}
    with pytest.raises(ValueError, match="not multiples of 4"):
        split_batch_for_cp(batch, cp_size=2, cp_rank=0)
    batch["seq_lens"] = [torch.tensor([8, 8])]
    with pytest.raises(ValueError, match="must cover the whole row"):
        split_batch_for_cp(batch, cp_size=2, cp_rank=0)
    with pytest.raises(ValueError, match="qkv_format"):
        packed_seq_params([[8]], qkv_format="bshd")


def _build_cp_models(kinds: list[str]) -> list[str]:
    return [_build_cp_model(k) for k in kinds]


def _build_cp_model(kind: str) -> str:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from v2pe_megatron.model.language import language_transformer_config
    from v2pe_megatron.model.specs import block_spec, layer_spec
    from v2pe_megatron.runtime.distributed import model_parallel

    recipe = _recipe("parallel.cp=2", "data.seq_length=64")
    with model_parallel(cp=2):
        cfg = language_transformer_config(recipe.model.language, recipe.parallel)
        try:
            if kind == "megatron_local":
                block_spec("local", cfg, layer_spec("local", core_attention=DotProductAttention))
            else:
                cfg.cp_comm_type = "a2a"
                block_spec("local", cfg, layer_spec("local"))
        except ValueError as e:
            return str(e)
    return "no error"


def test_model_build_rejects_attention_without_cp():
    from v2pe_megatron.testing.distributed import run_distributed

    msgs = run_distributed(_build_cp_models, 2, ["megatron_local", "a2a"], timeout=120)[0]
    assert "DotProductAttention has no context parallelism" in msgs[0], msgs[0]
    assert "use cp_comm_type=p2p" in msgs[1], msgs[1]
