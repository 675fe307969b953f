"""On a GPU with Transformer Engine: the TE spec gives the local spec's logits (bf16 tolerance).

The same weights reach both models through the HF table (local names -> HF -> TE names), which also
checks the norm-name mapping between the two specs.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _have_te() -> bool:
    from v2pe_megatron.parallel.layout import have_transformer_engine

    return have_transformer_engine()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_te_spec_matches_local_spec():
    if not _have_te():
        pytest.skip("needs transformer-engine")
    from v2pe_megatron import hf
    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import Layout
    from v2pe_megatron.runtime.distributed import model_parallel

    with model_parallel(1, 1):
        logits = {}
        states = {}
        for spec in ("local", "te"):
            recipe = load_recipe(None, ["model.preset=tiny", "model.dtype=bf16", f"model.spec={spec}"])
            torch.manual_seed(0)
            model = build_model(recipe.model, Layout(spec=spec)).eval()
            if spec == "te":
                local_table = hf.weight_map(recipe.model, "remote", "local")
                te_table = hf.weight_map(recipe.model, "remote", "te")
                hf_state = hf.megatron_to_hf(local_table, states["local"])
                mapped = hf.hf_to_megatron(te_table, hf_state)
                missing, unexpected = model.load_state_dict(mapped, strict=False)
                assert not [k for k in missing if not k.endswith("_extra_state")], missing
                assert not unexpected, unexpected
            states[spec] = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(10, 500, (2, 64), generator=g)
            ids[0, 5:9] = recipe.model.img_context_token_id
            pixels = torch.randn(1, 3, 56, 56, generator=g)
            pos = torch.arange(64, dtype=torch.float64).expand(2, -1)
            logits[spec] = model.logits(ids, pixels, pos)
        rel = float((logits["te"] - logits["local"]).abs().max() / logits["local"].abs().max())
        assert rel < 3e-2, rel
