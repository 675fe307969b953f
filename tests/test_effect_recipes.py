"""The V2PE effect experiment's two recipes differ in V2PE alone (docs/v2pe.md, "The V2PE effect")."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from v2pe_megatron.config import DEFAULT_DELTA_SET, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
BASELINE, V2PE = RECIPES / "effect_baseline_cpu.yaml", RECIPES / "effect_v2pe_cpu.yaml"


def test_the_two_recipes_differ_only_in_v2pe_and_name():
    files = [yaml.safe_load(p.read_text()) for p in (BASELINE, V2PE)]
    for f in files:
        f.pop("name"), f.pop("v2pe")
    assert files[0] == files[1]  # as written: no key of any other section differs, none is missing
    base, v2pe = (dataclasses.asdict(load_recipe(p)) for p in (BASELINE, V2PE))
    assert {k for k in base if base[k] != v2pe[k]} == {"name", "v2pe"}  # as loaded, defaults included
    assert base["v2pe"]["policy"] == "default"  # every image at delta 1: plain RoPE positions
    assert v2pe["v2pe"]["policy"] == "random" and v2pe["v2pe"]["delta_set"] == DEFAULT_DELTA_SET
    assert {k: v for k, v in base["v2pe"].items() if k != "policy"} == \
        {k: v for k, v in v2pe["v2pe"].items() if k != "policy"}
