"""train.loss_reduction=square through the real forward step: CP=2 and DP=2 give the loss and
gradients of 1 rank (the whole InternVL model on packs with images, text and padding).

The 1-rank run returns its initial weights; each layout loads them, draws the same global batch
through ``training.loss.step_batches`` (weights on the whole packs, the global N / W all-reduced over
the data-parallel group) and ``vlm_forward_step`` (CP split of tokens and weights), and takes one
step with SGD at lr 0, so the gradients stay in ``main_grad`` to compare.
"""

from __future__ import annotations

import pytest
import torch

from v2pe_megatron.testing.distributed import run_distributed

SEQ, ROWS, MICRO = 128, 2, 2


def _packs():
    from v2pe_megatron.testing.tiny import synthetic_packs

    return synthetic_packs(MICRO, rows=ROWS, seq_length=SEQ, pad_multiple=4, seed=7)


def run(cp: int, weights: dict | None) -> dict:
    from megatron.core import parallel_state as ps

    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.runtime.distributed import device, model_parallel
    from v2pe_megatron.testing.tiny import layout_of, tiny_recipe
    from v2pe_megatron.training.engine import build_optimizer, train_step, wrap_ddp
    from v2pe_megatron.training.forward import vlm_forward_step
    from v2pe_megatron.training.loss import step_batches

    torch.set_num_threads(1)
    recipe = tiny_recipe(f"data.seq_length={SEQ}", "model.language.num_layers=2", f"parallel.cp={cp}",
                         "optimizer.name=sgd", "optimizer.lr=0.0", "train.loss_reduction=square")
    with model_parallel(cp=cp, seed=3):
        model = build_model(recipe.model, layout_of(recipe))
        if weights is not None:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(torch.from_numpy(weights[name]))
        ddp = wrap_ddp(model, model.config)
        opt = build_optimizer(recipe.optimizer, [ddp], params_dtype=torch.float32)
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        mine = _packs()[dp_rank::dp]
        it = step_batches(iter(mine), len(mine), "square", device=device(),
                          group=ps.get_data_parallel_group(with_context_parallel=False))
        res = train_step([ddp], opt, vlm_forward_step, it, num_microbatches=len(mine), layout=model.layout,
                         seq_length=SEQ, micro_batch_size=ROWS)
        out = {"loss": res.loss, "grads": {n: p.main_grad.detach().clone().numpy()
                                           for n, p in model.named_parameters()}}
        if weights is None:
            out["weights"] = {n: p.detach().clone().numpy() for n, p in model.named_parameters()}
    return out


def run_layouts(weights: dict) -> dict:
    return {"cp2": run(2, weights), "dp2": run(1, weights)}


@pytest.mark.slow
def test_square_loss_cp2_and_dp2_match_one_rank():
    ref = run_distributed(run, 1, 1, None, timeout=240)[0]
    got = run_distributed(run_layouts, 2, ref["weights"], timeout=300)
    for rank, layouts in enumerate(got):
        for name, res in layouts.items():
            assert abs(res["loss"] - ref["loss"]) < 1e-5, (rank, name, res["loss"], ref["loss"])
    for name, res in got[0].items():
        for pname, g in ref["grads"].items():
            torch.testing.assert_close(torch.from_numpy(res["grads"][pname]), torch.from_numpy(g), atol=1e-5,
                                       rtol=1e-4, msg=lambda m, n=name, p=pname: f"{n} {p}: {m}")
