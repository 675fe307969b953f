"""``InternVLModel.freeze``: a frozen part gets no gradient and stays bit-identical through a training
step; every other part trains. One test per flag of the recipe (train.freeze_vision, _projector,
_language), through the training loop's own call and the real step machinery (DDP, Adam, the
forward step on packed micro-batches with images)."""

from __future__ import annotations

import pytest
import torch

PARTS = ("vision", "projector", "language")


def _step_with_frozen(part: str) -> dict:
    from v2pe_megatron.model.internvl import PARTS as ATTRS
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing.tiny import layout_of, synthetic_packs, tiny_recipe
    from v2pe_megatron.training.engine import build_optimizer, train_step, wrap_ddp
    from v2pe_megatron.training.forward import vlm_forward_step

    recipe = tiny_recipe("data.seq_length=64", "optimizer.lr=1e-2", f"train.freeze_{part}=true")
    t = recipe.train
    with model_parallel(seed=0):
        layout = layout_of(recipe)
        model = build_model(recipe.model, layout)
        # what the training loop does with the recipe's flags
        frozen = model.freeze(vision=t.freeze_vision, projector=t.freeze_projector, language=t.freeze_language)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        ddp = wrap_ddp(model, model.config)
        opt = build_optimizer(recipe.optimizer, [ddp], params_dtype=torch.float32)
        batches = synthetic_packs(2, rows=1, seq_length=64, pad_multiple=1, seed=2)
        assert sum(b.num_images for b in batches) > 0
        train_step([ddp], opt, vlm_forward_step, iter(batches), num_microbatches=2, layout=layout,
                   seq_length=64, micro_batch_size=1)
        out = {}
        for n, p in model.named_parameters():
            owner = next(k for k, attr in ATTRS.items() if n.startswith(attr + "."))
            grad = getattr(p, "main_grad", None)
            out[n] = {"part": owner, "requires_grad": p.requires_grad, "in_frozen_list": n in frozen,
                      "has_grad": grad is not None and bool(grad.abs().max() > 0),
                      "identical": torch.equal(p.detach(), before[n])}
    return out


@pytest.mark.parametrize("part", PARTS)
def test_freeze_flag_stops_exactly_that_part(part):
    params = _step_with_frozen(part)
    assert {v["part"] for v in params.values()} == set(PARTS)
    for name, v in params.items():
        if v["part"] == part:
            assert v["in_frozen_list"] and not v["requires_grad"] and not v["has_grad"], (name, v)
            assert v["identical"], f"{name} changed although {part} is frozen"
        else:
            assert v["requires_grad"] and not v["in_frozen_list"], (name, v)
    # the other parts trained: every one of their tensors moved
    moved = {v["part"] for v in params.values() if v["part"] != part and not v["identical"]}
    assert moved == set(PARTS) - {part}
    stuck = [n for n, v in params.items() if v["part"] != part and v["identical"]]
    assert not stuck, f"trainable but unchanged after a step: {stuck[:5]}"
