"""Every parallel layout of a tiny megatron-core transformer matches the single-process result.

Method: one reference rank builds the model, saves its weights as a torch_dist checkpoint, and takes
one SGD step with lr=1 (so ``w_new = w - grad`` exactly: the saved updated weights encode the
gradients). Each layout loads the same weights (megatron reshards them), takes the same step on the
same global batch, and saves its updated weights, which one rank then loads at TP=1/PP=1 and compares
tensor by tensor with the reference: equal updated weights <=> equal gradients. Losses are compared
directly. The distributed optimizer needs Adam; with eps=1 Adam's first update g/(|g|+1) is a
strictly monotone function of each gradient, so the same comparison still pins the gradients.
"""

from __future__ import annotations

import pytest
import torch

from v2pe_megatron.testing.distributed import run_distributed

NUM_MICRO = 4
MBS = 1
SEQ = 32


def _opts(optimizer: str) -> list[str]:
    if optimizer == "sgd":
        return ["optimizer.name=sgd", "optimizer.lr=1.0"]
    return ["optimizer.name=adam", "optimizer.lr=1.0", "optimizer.adam_eps=1.0"]


def _step(workdir: str, tp: int, pp: int, sp: bool, distopt: bool, optimizer: str, tag: str,
          init_from: str | None) -> dict:
    from megatron.core import parallel_state as ps

    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing import tiny
    from v2pe_megatron.training import checkpointing as ckpt
    from v2pe_megatron.training.engine import build_optimizer, sync_params, train_step, wrap_ddp

    world = torch.distributed.get_world_size()
    recipe = tiny.tiny_recipe(f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.sequence_parallel={sp}",
                              f"parallel.use_distributed_optimizer={distopt}", *_opts(optimizer))
    with model_parallel(tp, pp, seed=7):
        torch.manual_seed(7)
        model = tiny.build_language_model(recipe)
        if init_from is None:
            ckpt.save_model_weights(f"{workdir}/init", model)
        else:
            ckpt.load_model_weights(init_from, model)
        ddp = wrap_ddp(model, model.config, use_distributed_optimizer=distopt)
        opt = build_optimizer(recipe.optimizer, [ddp], params_dtype=torch.float32, use_distributed_optimizer=distopt)
        batches = tiny.synthetic_lm_batches(NUM_MICRO, micro_batch_size=MBS, seq_length=SEQ,
                                            vocab_size=recipe.model.language.vocab_size, seed=3)
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        mine = tiny.shard_for_data_parallel(batches, dp_rank, dp)
        res = train_step([ddp], opt, tiny.lm_forward_step, iter(mine), num_microbatches=len(mine),
                         seq_length=SEQ, micro_batch_size=MBS)
        sync_params([ddp])
        ckpt.save_model_weights(f"{workdir}/after_{tag}", model)
    return {"loss": res.loss, "tokens": res.num_tokens, "grad_norm": res.grad_norm, "world": world}


def _compare(ref_dir: str, other_dir: str) -> dict:
    """At TP=1/PP=1: max abs difference between two saved weight sets, per tensor."""
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing import tiny
    from v2pe_megatron.training import checkpointing as ckpt

    recipe = tiny.tiny_recipe()
    with model_parallel(1, 1):
        a = tiny.build_language_model(recipe)
        b = tiny.build_language_model(recipe)
        ckpt.load_model_weights(ref_dir, a)
        ckpt.load_model_weights(other_dir, b)
        sb = dict(b.named_parameters())
        return {n: (p - sb[n]).abs().max().item() for n, p in a.named_parameters()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("parity"))
    sgd = run_distributed(_step, 1, d, 1, 1, False, False, "sgd", "ref_sgd", None)[0]
    adam = run_distributed(_step, 1, d, 1, 1, False, False, "adam", "ref_adam", f"{d}/init")[0]
    return d, {"sgd": sgd, "adam": adam}


LAYOUTS = {
    # name: (world, tp, pp, sp, distopt, optimizer)
    "tp2": (2, 2, 1, False, False, "sgd"),
    "pp2": (2, 1, 2, False, False, "sgd"),
    "tp2_sp": (2, 2, 1, True, False, "sgd"),
    "dp2_distopt": (2, 1, 1, False, True, "adam"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_rank(reference, name):
    d, ref = reference
    world, tp, pp, sp, distopt, optimizer = LAYOUTS[name]
    out = run_distributed(_step, world, d, tp, pp, sp, distopt, optimizer, name, f"{d}/init")
    r = ref[optimizer]
    for o in out:  # every rank reports the same global loss
        assert o["tokens"] == r["tokens"]
        assert o["loss"] == pytest.approx(r["loss"], abs=1e-6, rel=1e-6)
        assert o["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5)
    diffs = run_distributed(_compare, 1, f"{d}/after_ref_{optimizer}", f"{d}/after_{name}")[0]
    assert len(diffs) >= 10  # embeddings, qkv, proj, fc1, fc2, norms, output
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-6, f"{name}: {worst} differs by {diffs[worst]:.3e}"
    # and the step really changed the weights (the comparison would be vacuous otherwise)
    moved = run_distributed(_compare, 1, f"{d}/init", f"{d}/after_{name}")[0]
    assert min(moved.values()) > 1e-4


def _logits_at(workdir: str, tp: int, pp: int, save: bool) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing import tiny
    from v2pe_megatron.training import checkpointing as ckpt
    from v2pe_megatron.training.engine import train_step, wrap_ddp

    recipe = tiny.tiny_recipe(f"parallel.tp={tp}", f"parallel.pp={pp}")
    with model_parallel(tp, pp, seed=11):
        torch.manual_seed(11)
        model = tiny.build_language_model(recipe)
        if save:
            ckpt.save_model_weights(f"{workdir}/tp{tp}", model)
        else:
            ckpt.load_model_weights(f"{workdir}/tp2", model)
        model.eval()
        batch = tiny.synthetic_lm_batches(1, micro_batch_size=2, seq_length=SEQ,
                                          vocab_size=recipe.model.language.vocab_size, seed=5)[0]
        captured = {}

        def fwd(it, m):
            b = next(it)
            out = m(b["tokens"], b["position_ids"])
            if ps.is_pipeline_last_stage():
                captured["logits"] = gather_from_tensor_model_parallel_region(out).detach().clone()
            return out, lambda o: (o.sum() * 0, torch.tensor(1), {"lm loss": torch.zeros(2)})

        ddp = wrap_ddp(model, model.config)
        with torch.no_grad():
            train_step([ddp], None, fwd, iter([batch]), num_microbatches=1, seq_length=SEQ, micro_batch_size=2,
                       forward_only=True)
        return {"logits": captured.get("logits"), "last": ps.is_pipeline_last_stage()}


@pytest.mark.slow
def test_checkpoint_saved_at_tp2_loads_at_tp1_and_pp2(tmp_path):
    d = str(tmp_path)
    saved = run_distributed(_logits_at, 2, d, 2, 1, True)
    ref = saved[0]["logits"]
    assert ref is not None and ref.shape == (2, SEQ, 512)
    tp1 = run_distributed(_logits_at, 1, d, 1, 1, False)[0]["logits"]
    pp2 = [r["logits"] for r in run_distributed(_logits_at, 2, d, 1, 2, False) if r["last"]][0]
    torch.testing.assert_close(tp1, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(pp2, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(pp2, tp1, rtol=0, atol=1e-6)
