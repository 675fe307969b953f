"""TP=2, PP=2 (unequal split), TP=2+SP give the same loss and gradients as one rank.

Every layout starts from the same weights (the 1-rank model saved as a torch_dist checkpoint and
loaded into each layout's sharding), runs one step of the real training machinery (megatron DDP,
1F1B schedule, per-token loss) on a batch with images and text-only samples and V2PE fractional
positions, then writes its gradients as a torch_dist checkpoint; a 1-rank process loads every
gradient checkpoint back into the 1-rank layout and compares tensor by tensor.
"""

from __future__ import annotations

import os

import pytest
import torch

from v2pe_megatron.testing.distributed import run_distributed

SEQ = 32
MBS = 2
N_MICRO = 2
TILE_TOKENS = 4  # tiny preset: 56px / 14px = 4x4 patches -> pixel shuffle 0.5 -> 4 tokens
CTX = 7          # tiny preset <IMG_CONTEXT>


def _recipe(tp: int = 1, pp: int = 1, sp: bool = False, pp_layers: tuple[int, ...] = ()):
    from v2pe_megatron.config import load_recipe

    ov = ["model.preset=tiny", f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.sequence_parallel={sp}",
          f"data.seq_length={SEQ}", "optimizer.name=sgd", "optimizer.clip_grad=0",
          "optimizer.weight_decay=0"]
    if pp_layers:
        ov.append(f"parallel.pp_layers=[{','.join(map(str, pp_layers))}]")
    return load_recipe(None, ov)


def _batches() -> list[dict]:
    """Micro-batch 0: row 0 one image, row 1 two images; micro-batch 1: text only."""
    g = torch.Generator().manual_seed(0)
    out = []
    for mb in range(N_MICRO):
        toks = torch.randint(10, 500, (MBS, SEQ + 1), generator=g)
        pos = torch.arange(SEQ + 1, dtype=torch.float64).expand(MBS, -1).clone()
        tiles = 0
        if mb == 0:
            toks[0, 4:4 + TILE_TOKENS] = CTX
            toks[1, 2:2 + 2 * TILE_TOKENS] = CTX
            tiles = 3
            # V2PE: visual tokens step by 1/4 (exact in float64), text continues after a ceiling
            for row, (a, n) in enumerate(((4, TILE_TOKENS), (2, 2 * TILE_TOKENS))):
                start = pos[row, a - 1]
                pos[row, a:a + n] = start + 0.25 * torch.arange(1, n + 1, dtype=torch.float64)
                nxt = torch.ceil(pos[row, a + n - 1]) + 1
                pos[row, a + n:] = nxt + torch.arange(SEQ + 1 - a - n, dtype=torch.float64)
        pixels = torch.randn(tiles, 3, 56, 56, generator=g) if tiles else None
        mask = (torch.rand(MBS, SEQ, generator=g) > 0.3).float()
        mask[toks[:, :-1] == CTX] = 0.0
        out.append(dict(tokens=toks[:, :-1], labels=toks[:, 1:], position_ids=pos[:, :-1], pixel_values=pixels,
                        loss_mask=mask))
    return out


def _step(model_chunks, recipe):
    from v2pe_megatron.training.engine import build_optimizer, masked_loss_func, train_step

    opt = build_optimizer(recipe.optimizer, model_chunks, params_dtype=torch.float32, lr=0.0)

    def fwd(it, model):
        b = next(it)
        out = model(b["tokens"], b["position_ids"], b["pixel_values"], labels=b["labels"])
        return out, masked_loss_func(b["loss_mask"])

    res = train_step(model_chunks, opt, fwd, iter(_batches()), num_microbatches=N_MICRO, seq_length=SEQ,
                     micro_batch_size=MBS)
    return res.loss


def _save_grads(inner, ddp, path: str) -> None:
    from megatron.core import dist_checkpointing

    with torch.no_grad():
        for p in ddp.module.parameters():
            p.copy_(p.main_grad)
    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(inner.sharded_state_dict(), path)


def run_layout(tmp: str, layout: dict) -> dict:
    torch.set_num_threads(1)
    from megatron.core import dist_checkpointing

    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.testing.tiny import layout_of
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.training.engine import wrap_ddp

    name = layout["name"]
    recipe = _recipe(layout.get("tp", 1), layout.get("pp", 1), layout.get("sp", False), layout.get("pp_layers", ()))
    with model_parallel(recipe.parallel.tp, recipe.parallel.pp):
        torch.manual_seed(0)
        model = build_model(recipe.model, layout_of(recipe))
        weights = os.path.join(tmp, "weights")
        if name == "ref":
            os.makedirs(weights, exist_ok=True)
            dist_checkpointing.save(model.sharded_state_dict(), weights)
        else:
            state = dist_checkpointing.load(model.sharded_state_dict(), weights)
            model.load_state_dict(state)
        ddp = wrap_ddp(model, model.config)
        loss = _step([ddp], recipe)
        _save_grads(model, ddp, os.path.join(tmp, f"grads_{name}"))
    return {"loss": loss}


def run_layouts(tmp: str, layouts: list[dict]) -> list[dict]:
    return [run_layout(tmp, lay) for lay in layouts]


def compare(tmp: str, names: list[str]) -> dict:
    torch.set_num_threads(1)
    from megatron.core import dist_checkpointing

    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.testing.tiny import layout_of
    from v2pe_megatron.runtime.distributed import model_parallel

    out = {}
    with model_parallel(1, 1):
        model = build_model(_recipe().model, layout_of(_recipe()))
        ref = dist_checkpointing.load(model.sharded_state_dict(), os.path.join(tmp, "grads_ref"))
        for name in names:
            got = dist_checkpointing.load(model.sharded_state_dict(), os.path.join(tmp, f"grads_{name}"))
            diffs, scale = {}, 0.0
            for k, r in ref.items():
                if not torch.is_tensor(r) or k.endswith("_extra_state"):
                    continue
                diffs[k] = float((got[k] - r).abs().max())
                scale = max(scale, float(r.abs().max()))
            out[name] = {"max_abs": max(diffs.values()), "worst": max(diffs, key=diffs.get), "scale": scale,
                         "n": len(diffs)}
        vis = [k for k in ref if k.startswith("vision_model.") and torch.is_tensor(ref[k])]
        out["vision_grad_nonzero"] = sum(int(ref[k].abs().max() > 0) for k in vis)
        out["vision_params"] = len(vis)
        # A text-only batch still gives every vision/projector parameter a (zero) gradient.
        model.train()
        b = _batches()[1]
        model(b["tokens"], b["position_ids"], None, labels=b["labels"]).sum().backward()
        tower = [p for m in (model.vision_model, model.projector) for p in m.parameters()]
        out["text_only_zero_grads"] = all(p.grad is not None and not p.grad.any() for p in tower)
        out["text_only_tower_params"] = len(tower)
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tp_pp_sp_match_single_rank(tmp_path):
    tmp = str(tmp_path)
    ref = run_distributed(run_layout, 1, tmp, {"name": "ref"}, timeout=300)[0]
    layouts = [{"name": "tp2", "tp": 2}, {"name": "pp2", "pp": 2, "pp_layers": (1, 3)},
               {"name": "tp2sp", "tp": 2, "sp": True}]
    results = run_distributed(run_layouts, 2, tmp, layouts, timeout=400)
    cmp = compare_in_subprocess(tmp, [lay["name"] for lay in layouts])
    # The reference itself has real gradients everywhere in the vision tower (images in micro-batch 0).
    assert cmp["vision_grad_nonzero"] == cmp["vision_params"] > 0
    assert cmp["text_only_zero_grads"] and cmp["text_only_tower_params"] > 0
    for i, lay in enumerate(layouts):
        for rank_result in results:
            assert abs(rank_result[i]["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (lay, rank_result[i], ref)
        c = cmp[lay["name"]]
        assert c["max_abs"] <= 1e-5 * c["scale"], (lay["name"], c)


def compare_in_subprocess(tmp: str, names: list[str]) -> dict:
    return run_distributed(compare, 1, tmp, names, timeout=300)[0]
