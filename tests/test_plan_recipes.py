"""The InternVL2-2B recipes: each validates for the cluster its header names and is exactly the layout
``v2pe-plan`` recommends there; V2PE's fine-tuning settings are kept."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from v2pe_megatron.config import DEFAULT_DELTA_SET, load_recipe, validate
from v2pe_megatron.plan import plan

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CASES = [("internvl2_2b_32k.yaml", 32768, 32), ("internvl2_2b_256k.yaml", 262144, 64),
         ("internvl2_2b_1m.yaml", 1 << 20, 64)]


@pytest.mark.parametrize("name,seq,gpus", CASES)
def test_recipe_validates_and_is_the_planners_recommendation(name, seq, gpus, monkeypatch):
    for var in ("V2PE_META_PATH", "V2PE_TOKENIZER", "V2PE_PRETRAINED", "V2PE_CKPT_DIR"):
        monkeypatch.delenv(var, raising=False)
    text = (RECIPES / name).read_text()
    # the header states the cluster and the command whose recommendation this is
    assert re.search(rf"Expected cluster: .*{gpus} ranks", text)
    assert f"--seq {seq} --gpus {gpus} --gpu-mem 80" in text
    recipe = load_recipe(RECIPES / name, validate_for_world_size=gpus)
    layout = validate(recipe, world_size=gpus)
    assert recipe.launcher.nproc_per_node * recipe.launcher.nnodes == gpus
    assert recipe.data.seq_length == seq

    best = plan("internvl2-2b", seq, gpus, 80, global_batch_size=recipe.data.global_batch_size,
                loss_chunk_tokens=recipe.model.loss_chunk_tokens).recommended
    assert best is not None
    ours = {"parallel.tp": layout.tp, "parallel.pp": layout.pp, "parallel.virtual_pp": layout.virtual_pp,
            "parallel.cp": layout.cp, "parallel.sequence_parallel": layout.sp,
            "parallel.use_distributed_optimizer": layout.distributed_optimizer,
            "parallel.cp_comm_type": layout.cp_comm_type, "data.micro_batch_size": recipe.data.micro_batch_size,
            "train.recompute": recipe.train.recompute}
    assert ours == best.parallel_overrides()
    assert layout.dp == best.dp

    # V2PE's setting: random per-image delta from {1 .. 1/256}, lr 5e-6, cosine, 3% warm-up, wd 0.05, bf16, 32 packs
    assert recipe.v2pe.policy == "random" and recipe.v2pe.delta_set == DEFAULT_DELTA_SET
    assert recipe.v2pe.delta_set[-1] == 1 / 256
    o = recipe.optimizer
    assert (o.lr, o.decay_style, o.warmup_fraction, o.weight_decay) == (5e-6, "cosine", 0.03, 0.05)
    assert recipe.model.dtype == "bf16" and recipe.data.global_batch_size == 32
    assert recipe.model.preset == "internvl2-2b"


def test_placeholders_are_overridable(tmp_path, monkeypatch):
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    monkeypatch.setenv("V2PE_META_PATH", str(meta))
    assert load_recipe(RECIPES / "internvl2_2b_32k.yaml").data.meta_path == str(meta)
    monkeypatch.setenv("V2PE_META_PATH", str(tmp_path / "missing.json"))
    with pytest.raises(Exception, match="no such file"):
        load_recipe(RECIPES / "internvl2_2b_32k.yaml")
