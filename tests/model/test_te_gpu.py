"""On a GPU with Transformer Engine: the TE spec gives the local spec's logits (bf16 tolerance).

The same weights reach the TE model through a checkpoint the local model wrote: one set of
checkpoint names for both specs (``model.checkpoint_names``), real TE's ``_extra_state`` included.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _have_te() -> bool:
    from v2pe_megatron.parallel.layout import have_transformer_engine

    return have_transformer_engine()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_te_spec_matches_local_spec(tmp_path):
    if not _have_te():
        pytest.skip("needs transformer-engine")
    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import Layout
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.training.checkpointing import load_model_weights, save_model_weights

    with model_parallel(1, 1):
        logits = {}
        for spec in ("local", "te"):
            recipe = load_recipe(None, ["model.preset=tiny", "model.dtype=bf16", f"model.spec={spec}"])
            torch.manual_seed(0)
            model = build_model(recipe.model, Layout(spec=spec)).eval()
            if spec == "local":
                save_model_weights(tmp_path / "local", model)
            else:
                load_model_weights(tmp_path / "local", model)
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(10, 500, (2, 64), generator=g)
            ids[0, 5:9] = recipe.model.img_context_token_id
            pixels = torch.randn(1, 3, 56, 56, generator=g)
            pos = torch.arange(64, dtype=torch.float64).expand(2, -1)
            logits[spec] = model.logits(ids, pixels, pos)
        rel = float((logits["te"] - logits["local"]).abs().max() / logits["local"].abs().max())
        assert rel < 3e-2, rel
