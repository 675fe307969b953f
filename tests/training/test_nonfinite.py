"""A step with a non-finite loss or grad norm updates nothing: weights, Adam's moments and step count
are bit-identical afterwards (megatron's own step would write NaN into all of them in fp32 and bf16,
where no loss scaler looks for inf), and the next finite step trains normally. Single rank, through
the training loop's own step function; the NaN is planted from outside (a wrapped forward step or a
gradient hook), never through a production code path."""

from __future__ import annotations

import math

import pytest
import torch

from v2pe_megatron.testing.poison import nan_loss, optimizer_state, same_state


@pytest.mark.parametrize("distributed_optimizer", [False, True])
@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_step_is_skipped_exactly(where, distributed_optimizer):
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing.tiny import layout_of, synthetic_packs, tiny_recipe
    from v2pe_megatron.training.engine import build_optimizer, train_step, wrap_ddp
    from v2pe_megatron.training.forward import vlm_forward_step

    recipe = tiny_recipe("data.seq_length=64", "optimizer.lr=1e-2")
    with model_parallel(seed=0):
        layout = layout_of(recipe)
        model = build_model(recipe.model, layout)
        ddp = wrap_ddp(model, model.config, use_distributed_optimizer=distributed_optimizer)
        opt = build_optimizer(recipe.optimizer, [ddp], params_dtype=torch.float32,
                              use_distributed_optimizer=distributed_optimizer)
        batches = synthetic_packs(3, rows=1, seq_length=64, pad_multiple=1, seed=2)

        def step(forward, batch):
            return train_step([ddp], opt, forward, iter([batch]), num_microbatches=1, layout=layout,
                              seq_length=64, micro_batch_size=1)

        assert step(vlm_forward_step, batches[0]).update_successful  # Adam state exists from here on
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = optimizer_state(opt)
        if where == "loss":
            res = step(nan_loss(vlm_forward_step), batches[1])
            assert math.isnan(res.loss)
        else:
            p0 = next(p for p in model.parameters() if p.requires_grad)
            hook = p0.register_hook(lambda g: g * float("inf"))
            res = step(vlm_forward_step, batches[1])
            hook.remove()
            assert math.isfinite(res.loss) and not math.isfinite(res.grad_norm)
        assert not res.update_successful
        assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
        assert same_state(optimizer_state(opt), state)
        # the poisoned gradients do not leak into the next step
        res = step(vlm_forward_step, batches[2])
        assert res.update_successful and math.isfinite(res.grad_norm)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert not any(torch.equal(p, weights[n]) for n, p in model.named_parameters() if p.requires_grad)
