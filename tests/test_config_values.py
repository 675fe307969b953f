"""Values that used to fail late (inside Adam after the model build, in the loader) or never: every
one is reported by ``load_recipe`` before anything is built, all together, each with its fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from v2pe_megatron.config import RecipeError, load_recipe

BAD = {
    "optimizer.lr=-1e-3": "optimizer.lr=-0.001 must be >= 0",
    "optimizer.warmup_fraction=2": "optimizer.warmup_fraction=2.0 must be in [0, 1]",
    "optimizer.weight_decay=-0.1": "optimizer.weight_decay=-0.1 must be >= 0",
    "optimizer.adam_beta1=1.0": "optimizer.adam_beta1=1.0 must be in [0, 1)",
    "optimizer.adam_beta2=-0.5": "optimizer.adam_beta2=-0.5 must be in [0, 1)",
    "optimizer.adam_eps=0": "optimizer.adam_eps=0.0 must be > 0",
    "optimizer.clip_grad=-1": "optimizer.clip_grad=-1.0 must be >= 0",
    "train.log_interval=0": "train.log_interval=0 must be >= 1",
    "train.wallclock_minutes=-5": "train.wallclock_minutes=-5.0 must be >= 0",
    "train.exit_after_steps=-1": "train.exit_after_steps=-1 must be >= 0",
    "train.max_nonfinite_steps=-1": "train.max_nonfinite_steps=-1 must be >= 0",
    "checkpoint.keep_last=-1": "checkpoint.keep_last=-1 must be >= 0",
    "checkpoint.save_interval=-10": "checkpoint.save_interval=-10 must be >= 0",
    "data.global_batch_size=0": "data.global_batch_size=0 must be >= 1",
    "data.max_image_pixels=-1": "data.max_image_pixels=-1 must be >= 0",
    "model.loss_chunk_tokens=-1": "model.loss_chunk_tokens=-1 must be >= 0",
    "tracking.retry_interval_s=0": "tracking.retry_interval_s=0.0 must be > 0",
    "data.meta_path=/nonexistent/meta.json": "data.meta_path='/nonexistent/meta.json': no such file",
    "data.tokenizer_path=/nonexistent/tok.model": "data.tokenizer_path='/nonexistent/tok.model': no such file",
}


@pytest.mark.parametrize("override", sorted(BAD))
def test_each_bad_value_is_named_with_its_fix(override):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, [override])
    assert BAD[override] in str(e.value)


def test_min_lr_above_lr():
    with pytest.raises(RecipeError, match=r"optimizer.min_lr=0.01 must be in \[0, optimizer.lr=0.001\]"):
        load_recipe(None, ["optimizer.lr=1e-3", "optimizer.min_lr=1e-2"])


def test_all_problems_come_together():
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["optimizer.lr=-1", "optimizer.warmup_fraction=2", "data.meta_path=/nope.json",
                           "train.log_interval=0"])
    msg = str(e.value)
    assert all(k in msg for k in ("optimizer.lr=", "warmup_fraction", "data.meta_path", "train.log_interval"))


def test_good_edges_are_accepted(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    load_recipe(None, ["optimizer.lr=0", "optimizer.warmup_fraction=1", "optimizer.warmup_fraction=0",
                       "optimizer.clip_grad=0", "checkpoint.keep_last=0", "optimizer.adam_beta1=0",
                       "data.max_image_pixels=0", f"data.meta_path={meta}"])
    load_recipe(Path(__file__).resolve().parents[1] / "recipes/tiny_cpu.yaml")
