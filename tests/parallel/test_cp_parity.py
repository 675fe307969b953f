"""Context parallelism end to end at the language-model level: CP=2 (x DP=2), CP=4 and CP=2 x TP=2
(sequence parallel) give the loss and gradients of CP=1, on packs of several unequal sub-samples
(text-only and with image markup, V2PE fractional positions restarting per sub-sample, padding).

Method: the CP=1 rank takes one step (SGD, lr=0: the gradients stay in ``main_grad``) and returns
its weights; every layout loads those weights (TP-sharded by megatron's partition attributes),
takes the same step on the same global batch split by ``split_batch_for_cp``, and returns its
gradients gathered back to full shapes. CP does not shard weights, and megatron's DDP sums
gradients over the data-and-context-parallel group, so they compare parameter by parameter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from v2pe_megatron.parallel.cp_split import tile_share
from v2pe_megatron.testing.distributed import run_distributed
from v2pe_megatron.testing.tiny import IMG_CTX, IMG_START, TOKENS_PER_TILE

SEQ = 128
PAD = 8          # 2*cp*tp for the largest layout (CP4; CP2 x TP2 with SP)
ROWS = 2         # rows per micro-batch
MICRO = 2        # micro-batches in the global batch
KINDS = ("lm", "internvl")  # the language model alone; the whole InternVL model (vision under CP)


def make_packs(seed: int = 5) -> list:
    """MICRO collated micro-batches of ROWS packs each, from data.packing (the training contract)."""
    from v2pe_megatron.testing.tiny import synthetic_packs

    return synthetic_packs(MICRO, rows=ROWS, seq_length=SEQ, pad_multiple=PAD, seed=seed)


def _recipe(tp: int, cp: int, sp: bool):
    from v2pe_megatron.config import load_recipe

    return load_recipe(None, ["model.preset=tiny", f"data.seq_length={SEQ}",
                              "model.language.num_layers=2", f"parallel.tp={tp}", f"parallel.cp={cp}",
                              f"parallel.sequence_parallel={sp}", "optimizer.name=sgd", "optimizer.lr=0.0",
                              "optimizer.clip_grad=0", "optimizer.weight_decay=0"])


def _build(recipe, kind: str):
    from v2pe_megatron.testing.tiny import build_language_model, layout_of

    if kind == "internvl":
        from v2pe_megatron.model.internvl import build_model

        model = build_model(recipe.model, layout_of(recipe))
        return model, model.config
    model = build_language_model(recipe)
    return model, model.config


def _glu(name: str, cfg) -> bool:
    # The LLM's MLP is gated (SwiGLU); InternViT's is not.
    return cfg.gated_linear_unit and name.endswith("linear_fc1.weight") and not name.startswith("vision_model.")


def _shard(name: str, full: torch.Tensor, p: torch.nn.Parameter, cfg, tp: int, rank: int) -> torch.Tensor:
    if not getattr(p, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = p.partition_dim
    if _glu(name, cfg):  # [gate; up] per rank, not a plain slice of [gate; up]
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[rank], up.chunk(tp, dim=dim)[rank]], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def _gather(name: str, local: torch.Tensor, p: torch.nn.Parameter, cfg) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if not getattr(p, "tensor_model_parallel", False) or tp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(tp)]
    torch.distributed.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    dim = p.partition_dim
    if _glu(name, cfg):
        halves = [t.chunk(2, dim=dim) for t in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)


def _forward_step(data_iterator, model):
    from v2pe_megatron.training.engine import masked_loss_func

    from v2pe_megatron.training.checkpointing import unwrap

    b = next(data_iterator)
    if hasattr(unwrap(model), "vision_model"):  # InternVL: the pack's tiles, encoded in shares over the CP ranks
        out = model(b.tokens, b.position_ids, b.pixel_values, labels=b.labels,
                    packed_seq_params=b.packed_seq_params, image_exchange=b.image_exchange)
    else:
        out = model(b.tokens, b.position_ids, labels=b.labels, packed_seq_params=b.packed_seq_params)
    return out, masked_loss_func(b.loss_mask)


def run_layout(tp: int, cp: int, sp: bool, weights: dict | None, kind: str = "lm") -> dict:
    from megatron.core import parallel_state as ps

    from v2pe_megatron.parallel.packed_seq import split_batch_for_cp
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.training.engine import build_optimizer, train_step, wrap_ddp

    torch.set_num_threads(1)
    recipe = _recipe(tp, cp, sp)
    with model_parallel(tp=tp, cp=cp, seed=3):
        torch.manual_seed(3)
        model, cfg = _build(recipe, kind)
        tp_rank = ps.get_tensor_model_parallel_rank()
        if weights is not None:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(_shard(name, torch.from_numpy(weights[name]), p, cfg, tp, tp_rank))
        ddp = wrap_ddp(model, cfg)
        opt = build_optimizer(recipe.optimizer, [ddp], params_dtype=torch.float32)
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        cp_rank = ps.get_context_parallel_rank()
        ctx_id = IMG_CTX if kind == "internvl" else None
        mine = [split_batch_for_cp(b, cp_size=cp, cp_rank=cp_rank, img_context_id=ctx_id)
                for b in make_packs()[dp_rank::dp]]
        encoded: list[int] = []  # tiles this rank's vision tower encodes per micro-batch
        if kind == "internvl":
            model.vision_model.register_forward_hook(lambda m, args, out: encoded.append(int(args[0].shape[0])))
        res = train_step([ddp], opt, _forward_step, iter(mine), num_microbatches=len(mine),
                         seq_length=SEQ, micro_batch_size=ROWS)
        # numpy, not tensors: torch's queue pickler would share tensor storage with an exiting process
        grads = {n: _gather(n, p.main_grad.detach().clone(), p, cfg).numpy() for n, p in model.named_parameters()}
        out = {"loss": res.loss, "tokens": res.num_tokens, "grads": grads, "encoded": encoded,
               "tiles": [int(b.num_tiles.sum()) for b in mine], "cp_rank": cp_rank}
        if weights is None:
            out["weights"] = {n: p.detach().clone().numpy() for n, p in model.named_parameters()}
    return out


def run_reference() -> dict:
    return {kind: run_layout(1, 1, False, None, kind) for kind in KINDS}


def run_all_layouts(weights: dict) -> dict:
    """One 4-rank world runs the layouts one after another (a spawn costs seconds of imports)."""
    assert torch.distributed.get_world_size() == 4
    out = {}
    for kind in KINDS:
        out[f"{kind} cp2xdp2"] = run_layout(1, 2, False, weights[kind], kind)
        out[f"{kind} cp4"] = run_layout(1, 4, False, weights[kind], kind)
        out[f"{kind} cp2xtp2sp"] = run_layout(2, 2, True, weights[kind], kind)
    return {k: v if torch.distributed.get_rank() == 0 else {"loss": v["loss"], "encoded": v["encoded"],
                                                               "tiles": v["tiles"], "cp_rank": v["cp_rank"]}
            for k, v in out.items()}


@pytest.fixture(scope="module")
def reference():
    return run_distributed(run_reference, 1, timeout=240)[0]


def test_packs_hold_images_text_and_padding():
    batches = make_packs()
    lens = [r.tolist() for b in batches for r in b.seq_lens]
    assert all(sum(r) == SEQ and len(r) >= 3 for r in lens)
    pos = torch.cat([b.position_ids.flatten() for b in batches])
    assert (pos != pos.round()).any()  # fractional V2PE positions
    tokens = torch.cat([b.tokens.flatten() for b in batches])
    assert (tokens == IMG_START).any()
    for b in batches:  # one feature row per <IMG_CONTEXT> token
        assert b.pixel_values.shape[0] * TOKENS_PER_TILE == int((b.tokens == IMG_CTX).sum())
    assert any(b.pixel_values.shape[0] % 4 for b in batches)  # CP4 shares of unequal sizes


@pytest.mark.slow
def test_cp_layouts_match_cp1(reference):
    results = run_distributed(run_all_layouts, 4, {k: v["weights"] for k, v in reference.items()}, timeout=480)
    for name, res in results[0].items():
        ref = reference[name.split()[0]]
        assert res["tokens"] == ref["tokens"], name
        assert abs(res["loss"] - ref["loss"]) < 1e-5, (name, res["loss"], ref["loss"])
        assert res["grads"].keys() == ref["grads"].keys()
        for pname, g in ref["grads"].items():
            torch.testing.assert_close(torch.from_numpy(res["grads"][pname]), torch.from_numpy(g), atol=1e-5, rtol=1e-4,
                                       msg=lambda m, n=name, p=pname: f"{n} {p}: {m}")
    vision = [n for n in reference["internvl"]["grads"] if n.startswith("vision_model.")]
    assert vision and all(np.abs(reference["internvl"]["grads"][n]).sum() > 0 for n in vision[:3])
    for r in results[1:]:  # every rank reports the same global loss
        for name, res in r.items():
            assert abs(res["loss"] - results[0][name]["loss"]) < 1e-6
    # Vision under CP: each CP rank encoded only its share of every micro-batch's tiles.
    for r in results:
        for name, res in r.items():
            if name.startswith("internvl"):
                cp = 4 if "cp4" in name else 2
                shares = [tile_share(t, cp, res["cp_rank"]) for t in res["tiles"]]
                assert res["encoded"] == [b - a for a, b in shares if b > a], (name, res)
