"""InternViT's layer scale + drop path in megatron's bias-dropout-add slot."""

from __future__ import annotations

import torch

from v2pe_megatron.model.vision import LayerScaleBDA


def test_layer_scale_bda_eval_and_drop_path():
    bda = LayerScaleBDA(8, init_value=0.5)
    with torch.no_grad():
        bda.ls.copy_(torch.linspace(0.1, 0.8, 8))
    x, bias, res = torch.randn(5, 64, 8), torch.randn(8), torch.randn(5, 64, 8)
    out = bda(False, False)((x, bias), res, 0.0)
    assert torch.allclose(out, res + bda.ls * (x + bias))
    # training with drop path: each tile (batch column) keeps the whole branch scaled by 1/keep, or drops it
    bda.drop_prob = 0.5
    torch.manual_seed(0)
    out = bda(True, False)((x, None), res, 0.0)
    got = (out - res).transpose(0, 1).reshape(64, -1)
    full = (2.0 * bda.ls * x).transpose(0, 1).reshape(64, -1)
    kept = torch.isclose(got, full, atol=1e-5).all(1)
    dropped = (got.abs() < 1e-5).all(1)
    assert bool((kept | dropped).all()) and 10 < int(kept.sum()) < 54
    out.sum().backward()
    assert bda.ls.grad is not None
