"""Recipes: YAML + dotted overrides onto typed dataclasses; every bad recipe fails before launch with
a message that names the key and says what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from v2pe_megatron.config import PRESETS, Recipe, RecipeError, flatten, load_recipe, to_dict, to_yaml, validate

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_load(path):
    r = load_recipe(path)
    assert isinstance(r, Recipe)
    assert r.name == path.stem


def test_tiny_cpu_recipe():
    r = load_recipe(ROOT / "recipes/tiny_cpu.yaml")
    assert r.model.preset == "tiny"
    assert r.model.language.hidden_size == PRESETS["tiny"]["language"]["hidden_size"]
    assert r.launcher.nproc_per_node == 2
    validate(r, world_size=2)


def test_overrides_are_typed_and_win_over_yaml():
    r = load_recipe(ROOT / "recipes/tiny_cpu.yaml", ["train.steps=3", "optimizer.lr=0.5", "v2pe.policy=fixed",
                                                    "v2pe.delta=0.25"])
    assert r.train.steps == 3 and isinstance(r.train.steps, int)
    assert r.optimizer.lr == 0.5
    assert (r.v2pe.policy, r.v2pe.delta) == ("fixed", 0.25)


def test_recipe_keys_override_preset(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  preset: internvl2-2b\n  language:\n    num_layers: 2\n")
    r = load_recipe(p)
    assert r.model.language.num_layers == 2
    assert r.model.language.hidden_size == 2048  # from the preset / defaults
    assert r.name == "r"


@pytest.mark.parametrize("override,needle", [
    (["train.stepz=3"], "stepz"),                          # unknown key
    (["train.steps=many"], "train.steps"),                 # wrong type
    (["model.preset=gpt5"], "model.preset"),
    (["parallel.tp=3"], "parallel.tp=3 must divide"),
    (["parallel.sequence_parallel=true"], "needs parallel.tp > 1"),
    (["parallel.cp=2", "data.seq_length=30"], "divisible by 2*cp = 4"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.cp=2", "data.seq_length=36"],
     "divisible by 2*cp*tp"),
    (["parallel.pp=3"], "parallel.pp=3 must divide"),
    (["parallel.pp=2", "parallel.pp_layers=[1,2]"], "sum to"),
    (["v2pe.delta=1.5"], "v2pe.delta"),
    (["v2pe.policy=sometimes"], "v2pe.policy"),
    (["parallel.cp=4", "parallel.cp_comm_type=a2a", "data.seq_length=64"], "KV heads"),
    (["parallel.cp=4", "parallel.cp_comm_type=a2a+p2p", "parallel.hierarchical_cp_sizes=[2,3]",
      "data.seq_length=64"], "hierarchical_cp_sizes"),
    (["data.image_size=448"], "image_size"),  # one image size per recipe: model.vision.image_size
    (["data.global_batch_size=3", "data.micro_batch_size=2"], "multiple of"),
])
def test_bad_recipes_fail_with_clear_messages(override, needle):
    with pytest.raises(RecipeError) as e:
        load_recipe(ROOT / "recipes/tiny_cpu.yaml", override)
    assert needle in str(e.value)


def test_world_size_must_match_layout():
    r = load_recipe(ROOT / "recipes/tiny_cpu.yaml", ["parallel.tp=2"])
    with pytest.raises(RecipeError, match="world size 3 is not divisible by tp\\*pp\\*cp"):
        validate(r, world_size=3)
    r = load_recipe(ROOT / "recipes/tiny_cpu.yaml", ["parallel.tp=2", "parallel.dp=2"])
    with pytest.raises(RecipeError, match="launch 4 processes"):
        validate(r, world_size=2)
    validate(r, world_size=4)


def test_all_problems_reported_at_once():
    with pytest.raises(RecipeError) as e:
        load_recipe(ROOT / "recipes/tiny_cpu.yaml", ["parallel.tp=3", "v2pe.delta=2.0"])
    assert "parallel.tp=3" in str(e.value) and "v2pe.delta" in str(e.value)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="key.sub=value"):
        load_recipe(None, ["train.steps"])


def test_round_trip_and_flatten():
    r = load_recipe(ROOT / "recipes/tiny_cpu.yaml")
    flat = flatten(to_dict(r))
    assert flat["parallel.tp"] == 1 and flat["model.language.hidden_size"] == 64
    assert "tiny_cpu" in to_yaml(r)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_validate(preset):
    load_recipe(None, [f"model.preset={preset}"])


@pytest.mark.parametrize("text, expect", [("", "is empty"), ("# a comment only\n", "is empty"),
                                          ("- model\n- data\n", "not a list")])
def test_empty_or_list_recipe_file_is_refused(tmp_path, text, expect):
    # an empty file used to become the defaults (an InternVL2-2B, built before anything failed), a
    # list a traceback
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=expect) as e:
        load_recipe(p)
    assert "recipes/tiny_cpu.yaml" in str(e.value) and "--list" in str(e.value)


def test_env_placeholders_name_their_variables():
    from v2pe_megatron.config import env_placeholders

    root = Path(__file__).resolve().parents[1] / "recipes"
    assert env_placeholders(root / "internvl2_2b_32k.yaml") == {
        "data.meta_path": "V2PE_META_PATH", "data.tokenizer_path": "V2PE_TOKENIZER",
        "checkpoint.dir": "V2PE_CKPT_DIR", "checkpoint.pretrained": "V2PE_PRETRAINED"}
    assert env_placeholders(root / "tiny_cpu.yaml") == {}
