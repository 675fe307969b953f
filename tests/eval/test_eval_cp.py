"""v2pe-eval under context and tensor parallelism gives the one-rank scores, from a checkpoint
(slow: gloo ranks)."""

from __future__ import annotations

import pytest

from v2pe_megatron.testing.distributed import run_distributed

SETTINGS = dict(deltas=[1.0, 1 / 16, "auto"], lengths=[96, 160], depths=[0.0, 1.0], trained_positions=150,
                max_new_tokens=3)


def _recipe(cp: int, tp: int = 1):
    from v2pe_megatron.testing.tiny import tiny_recipe

    return tiny_recipe("model.spec=local", f"parallel.cp={cp}", f"parallel.tp={tp}", "tracking.backend=none",
                       "data.global_batch_size=1")


def _evaluate(cp: int, ckpt: str, out: str, save: bool, tp: int = 1):
    from v2pe_megatron.eval.runner import EvalSettings, Source, evaluate

    recipe = _recipe(cp, tp)
    if save:  # weights unlike the recipe's own random init, so the run must read them to match
        from v2pe_megatron.model.internvl import build_model
        from v2pe_megatron.runtime.distributed import model_parallel
        from v2pe_megatron.testing.tiny import layout_of
        from v2pe_megatron.training.checkpointing import save_model_weights

        with model_parallel(seed=99):
            save_model_weights(ckpt, build_model(recipe.model, layout_of(recipe)))
    settings = EvalSettings(**SETTINGS, out_dir=None)
    source = Source(tasks=("retrieval-text", "counting-image"))
    report = evaluate(recipe, settings, source, ckpt=ckpt)
    assert str(report.checkpoint) == ckpt  # the folder it read, which v2pe-eval prints
    with_ckpt = report.records
    fresh = evaluate(recipe, EvalSettings(**{**SETTINGS, "deltas": [1.0]}, modes=("teacher-forced",)),
                     source).records if save else None
    return with_ckpt, fresh


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """The one-rank records from a saved checkpoint, and those of the recipe's own random weights."""
    tmp = tmp_path_factory.mktemp("eval_cp")
    ckpt = str(tmp / "weights")
    (one, fresh), = run_distributed(_evaluate, 1, 1, ckpt, str(tmp), True)
    return ckpt, one, fresh


def _same(one, other):
    assert len(one) == len(other) == 2 * 2 * 2 * 3  # tasks x lengths x depths x deltas
    for a, b in zip(one, other):
        assert (a["id"], a["delta"], a["delta_value"], a["tokens"], a["last_position"]) == \
            (b["id"], b["delta"], b["delta_value"], b["tokens"], b["last_position"])
        assert (a["response"], a["generate"], a["tf_acc"]) == (b["response"], b["generate"], b["tf_acc"])
        assert a["tf_logp"] == pytest.approx(b["tf_logp"], abs=1e-5)


@pytest.mark.slow
def test_cp2_scores_equal_cp1(one_rank, tmp_path):
    ckpt, one, fresh = one_rank
    two = run_distributed(_evaluate, 2, 2, ckpt, str(tmp_path), False)
    assert two[0][0] == two[1][0]  # every rank returns the gathered records
    _same(one, two[0][0])
    # the checkpoint was read: its log-probs are not those of the recipe's own random weights
    at1 = [a for a in one if a["delta"] == "1"]
    assert [a["id"] for a in at1] == [f["id"] for f in fresh]
    assert max(abs(a["tf_logp"] - f["tf_logp"]) for a, f in zip(at1, fresh)) > 1e-3
    # the deltas make a difference to the positions the model sees
    by = {(r["id"], r["delta"]): r for r in one}
    assert all(by[(i, "1/16")]["last_position"] < by[(i, "1")]["last_position"] for i, _ in by)


@pytest.mark.slow
def test_tp2_scores_equal_tp1(one_rank, tmp_path):
    """Vocab-parallel logits: the scored rows are gathered over TP before the softmax."""
    ckpt, one, _ = one_rank
    two = run_distributed(_evaluate, 2, 1, ckpt, str(tmp_path), False, 2)
    _same(one, two[0][0])
