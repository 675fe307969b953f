"""The distributed optimizer's checkpoint, written DP-sharded (``training/optimizer_state.py``), is
megatron's ``fully_reshardable`` checkpoint: the same global tensors, bit for bit, as megatron's own
(gathering) writer makes, so either reader loads either; and it reshards to another TP/DP layout.

Method: a DP=3 run takes two Adam steps and saves twice, once through ``save_checkpoint`` and once
through megatron's own ``fully_reshardable`` writer (what this project wrote before). They are then
loaded at TP=2 (both), PP=2 and 1 rank (by ``load_checkpoint`` and by megatron's own reader) and
saved again through megatron's writer: every tensor of every checkpoint, read whole in one process,
equals the reference's.
"""

from __future__ import annotations

import pytest
import torch

from v2pe_megatron.testing.distributed import run_distributed

SEQ, MBS, NUM_MICRO = 32, 1, 2
META = {"distrib_optim_sharding_type": "fully_reshardable"}


def _build(tp: int, pp: int = 1):
    from v2pe_megatron.testing import tiny
    from v2pe_megatron.training.engine import build_optimizer, wrap_ddp

    recipe = tiny.tiny_recipe(f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.use_distributed_optimizer=true",
                              "optimizer.name=adam", "optimizer.lr=0.01")
    torch.manual_seed(3)
    model = tiny.build_language_model(recipe)
    ddp = wrap_ddp(model, model.config, use_distributed_optimizer=True)
    opt = build_optimizer(recipe.optimizer, [ddp], params_dtype=torch.float32, use_distributed_optimizer=True)
    return recipe, model, ddp, opt


def _megatron_save(path, model, opt) -> None:
    """What the project wrote before: megatron's own fully_reshardable writer."""
    from megatron.core import dist_checkpointing

    from v2pe_megatron.training import checkpointing as ckpt

    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True)
    torch.distributed.barrier()
    ckpt._ensure_optimizer_state(opt)
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd, "iteration": 2, "extra": {},
             "optimizer": opt.sharded_state_dict(model_sd, is_loading=False, metadata=META)}
    dist_checkpointing.save(state, str(path), content_metadata=META)
    torch.distributed.barrier()


def _train_and_save(root: str) -> int:
    from pathlib import Path

    from megatron.core import parallel_state as ps

    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing import tiny
    from v2pe_megatron.training import checkpointing as ckpt
    from v2pe_megatron.training.engine import train_step

    with model_parallel(1, 1, seed=3):
        recipe, model, ddp, opt = _build(1)
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        for step in range(2):
            batches = tiny.synthetic_lm_batches(NUM_MICRO * dp, micro_batch_size=MBS, seq_length=SEQ,
                                                vocab_size=recipe.model.language.vocab_size, seed=100 + step)
            train_step([ddp], opt, tiny.lm_forward_step, iter(tiny.shard_for_data_parallel(batches, dp_rank, dp)),
                       num_microbatches=NUM_MICRO, seq_length=SEQ, micro_batch_size=MBS)
        ckpt.save_checkpoint(f"{root}/new", 2, [ddp], opt)
        old = ckpt.iteration_dir(f"{root}/old", 2)
        _megatron_save(old, model, opt)
        ckpt.write_manifest(old)
        if torch.distributed.get_rank() == 0:
            (Path(root) / "old" / "latest").write_text("2")
        # parameters whose state this rank holds only part of (cut by the DP split): the boxes matter
        return sum(1 for buckets in opt.chained_optimizers[0].gbuf_ranges[0].values() for b in buckets
                   for p, r in b["param_map"].items() if r["param"].size != p.numel())


def _reload_at_tp2_and_pp2(root: str) -> list[int]:
    from pathlib import Path

    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.training import checkpointing as ckpt

    steps = []
    for tp, pp, src in ((2, 1, "new"), (2, 1, "old"), (1, 2, "new")):
        with model_parallel(tp, pp, seed=5):
            _, model, ddp, opt = _build(tp, pp)
            it, _ = ckpt.load_checkpoint(f"{root}/{src}", [ddp], opt)
            assert it == 2
            steps.append(opt.state_dict()["optimizer"]["param_groups"][0]["step"])
            _megatron_save(Path(root) / f"tp{tp}pp{pp}_{src}", model, opt)
    return steps


def _reload_at_one_rank_and_compare(root: str) -> dict:
    from pathlib import Path

    from megatron.core import dist_checkpointing

    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.training import checkpointing as ckpt

    with model_parallel(1, 1, seed=5):
        _, model, ddp, opt = _build(1)  # megatron's own reader on the DP-sharded checkpoint
        ckpt._ensure_optimizer_state(opt)
        model_sd = model.sharded_state_dict()
        loaded = dist_checkpointing.load({"model": model_sd, "optimizer": opt.sharded_state_dict(
            model_sd, is_loading=True, metadata=META)}, str(ckpt.iteration_dir(f"{root}/new", 2)))
        model.load_state_dict(loaded["model"])
        opt.load_state_dict(loaded["optimizer"])
        _megatron_save(Path(root) / "one_megatron", model, opt)
        _, model, ddp, opt = _build(1)
        ckpt.load_checkpoint(f"{root}/new", [ddp], opt)
        _megatron_save(Path(root) / "one_new", model, opt)

        def tensors(path) -> dict:
            return {k: v for k, v in dist_checkpointing.load_plain_tensors(str(path)).items() if torch.is_tensor(v)}

        ref = tensors(ckpt.iteration_dir(f"{root}/old", 2))
        out = {"keys": sorted(ref), "diff": {}}
        for name, path in (("written DP-sharded", ckpt.iteration_dir(f"{root}/new", 2)), ("tp2pp1_new", None),
                           ("tp2pp1_old", None), ("tp1pp2_new", None), ("one_megatron", None), ("one_new", None)):
            got = tensors(path or Path(root) / name)
            got = {k: v for k, v in got.items() if k in ref or k.startswith("optimizer.")}
            assert sorted(got) == sorted(ref), (name, sorted(set(got) ^ set(ref)))
            out["diff"][name] = max((got[k] - ref[k]).abs().max().item() for k in ref)
        return out


@pytest.mark.slow
def test_dp_sharded_optimizer_checkpoint_is_megatrons_and_reshards(tmp_path):
    d = str(tmp_path)
    # DP=3: the split falls inside parameters (at DP=2 the preset's buffer halves between layers)
    split = run_distributed(_train_and_save, 3, d)
    assert min(split) >= 1  # each rank owns part of some parameter: the boxes cut inside tensors
    assert run_distributed(_reload_at_tp2_and_pp2, 2, d)[0] == [2, 2, 2]  # Adam's step count came back
    out = run_distributed(_reload_at_one_rank_and_compare, 1, d)[0]
    assert sum(k.startswith("optimizer.state.exp_avg_sq.") for k in out["keys"]) == 9  # embedding, output, final norm, 6 per layer
    assert out["diff"] == {k: 0.0 for k in out["diff"]}, out["diff"]
