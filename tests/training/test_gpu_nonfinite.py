"""On CUDA: a non-finite step under bf16 + the distributed optimizer updates nothing, bit for bit.

The CPU suite proves this in fp32 (``test_nonfinite.py``); what users run on GPUs is bf16 weights
with megatron's distributed optimizer, where the optimizer keeps fp32 main copies of the weights
(sharded over data-parallel ranks) and Adam's moments next to them, and copies the main weights
back into the bf16 model after a step. A poisoned step (a NaN loss, or an inf gradient planted by a
hook on one parameter) must leave all three bit-identical: the bf16 weights, the fp32 main weights
and every optimizer state tensor (``exp_avg``, ``exp_avg_sq``, ``step``); the next finite step
trains normally. Run as a script it does the same on whatever device there is (the CPU in
``tools/device_check.sh --dry-run``) and prints the line the check's summary takes.
"""

from __future__ import annotations

import math

import pytest
import torch

from v2pe_megatron.testing.poison import nan_loss, optimizer_state, same_state

pytestmark = pytest.mark.gpu


def poisoned_steps() -> dict:
    """For a NaN loss and an inf gradient: was the update skipped, and is every weight, main weight
    and optimizer state tensor unchanged; then whether the next finite step updated."""
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing.tiny import layout_of, synthetic_packs, tiny_recipe
    from v2pe_megatron.training.engine import build_optimizer, train_step, wrap_ddp
    from v2pe_megatron.training.forward import vlm_forward_step

    recipe = tiny_recipe("data.seq_length=64", "optimizer.lr=1e-2", "model.dtype=bf16",
                         "parallel.use_distributed_optimizer=true")
    out = {}
    with model_parallel(seed=0):
        layout = layout_of(recipe)
        assert layout.distributed_optimizer
        model = build_model(recipe.model, layout)
        ddp = wrap_ddp(model, model.config, use_distributed_optimizer=True)
        opt = build_optimizer(recipe.optimizer, [ddp], params_dtype=torch.bfloat16, use_distributed_optimizer=True)
        batches = synthetic_packs(4, rows=1, seq_length=64, pad_multiple=1, seed=2)
        out["device"] = next(model.parameters()).device.type
        out["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        out["optimizer"] = type(getattr(opt, "chained_optimizers", [opt])[0]).__name__

        def step(forward, batch):
            return train_step([ddp], opt, forward, iter([batch]), num_microbatches=1, layout=layout,
                              seq_length=64, micro_batch_size=1)

        assert step(vlm_forward_step, batches[0]).update_successful  # Adam state exists from here on
        for where, batch in (("loss", batches[1]), ("grad", batches[2])):
            weights = {n: p.detach().clone() for n, p in model.named_parameters()}
            state = optimizer_state(opt)
            if where == "loss":
                res = step(nan_loss(vlm_forward_step), batch)
            else:
                p0 = next(p for p in model.parameters() if p.requires_grad)
                hook = p0.register_hook(lambda g: g * float("inf"))
                res = step(vlm_forward_step, batch)
                hook.remove()
            out[where] = {"loss": res.loss, "grad_norm": res.grad_norm, "skipped": not res.update_successful,
                          "weights_same": all(torch.equal(p, weights[n]) for n, p in model.named_parameters()),
                          "state_same": same_state(optimizer_state(opt), state), "tensors": len(weights) + len(state),
                          "moments": sum(1 for k in state if k[2] in ("exp_avg", "exp_avg_sq"))}
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = optimizer_state(opt)
        res = step(vlm_forward_step, batches[3])
        # the comparison sees a real update (weights, main weights and moments all move)
        out["next"] = {"updated": res.update_successful and math.isfinite(res.grad_norm),
                       "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
                       "changed": sum(not torch.equal(p, weights[n]) for n, p in model.named_parameters()),
                       "state_changed": not same_state(optimizer_state(opt), state)}
    return out


def summary_line(r: dict) -> str:
    def part(k):
        x = r[k]
        return (f"{k} ({'loss nan' if k == 'loss' else f'grad norm {x['grad_norm']}'}): "
                f"{'skipped' if x['skipped'] else 'NOT skipped'}, weights+main weights+state "
                f"{'bit-identical' if x['weights_same'] and x['state_same'] else 'CHANGED'} "
                f"({x['tensors']} tensors, {x['moments']} moments)")
    return (f"nonfinite: {r['device']} {r['dtype']} {r['optimizer']}: {part('loss')}; {part('grad')}; next step "
            f"{'updated' if r['next']['updated'] and r['next']['finite'] else 'FAILED'} "
            f"({r['next']['changed']} weights changed)")


def check(r: dict) -> None:
    assert r["dtype"] == "bfloat16" and r["optimizer"] == "DistributedOptimizer", r
    for where in ("loss", "grad"):
        x = r[where]
        assert x["skipped"] and x["weights_same"] and x["state_same"] and x["moments"] > 0, (where, x)
    assert math.isnan(r["loss"]["loss"]) and not math.isfinite(r["grad"]["grad_norm"])
    nxt = r["next"]
    assert nxt["updated"] and nxt["finite"] and nxt["changed"] > 0 and nxt["state_changed"], nxt


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nonfinite_step_leaves_bf16_distributed_optimizer_state_bit_identical():
    r = poisoned_steps()
    print("\n" + summary_line(r))
    assert r["device"] == "cuda"
    check(r)


if __name__ == "__main__":  # the same on whatever device there is (CPU: gloo); device_check --dry-run
    r = poisoned_steps()
    print(summary_line(r))
    check(r)
