"""Invalid context-parallel layouts fail before training, with a message that says what to change."""

from __future__ import annotations

import pytest
import torch

from v2pe_megatron.config import RecipeError, load_recipe
from v2pe_megatron.parallel.packed_seq import packed_seq_params, split_batch_for_cp

BASE = ["model.preset=tiny"]


def _recipe(*overrides: str):
    return load_recipe(None, BASE + list(overrides))


@pytest.mark.parametrize("overrides, fragment", [
    (["parallel.cp=2", "data.seq_length=30"], "divisible by 2*cp = 4; use e.g. seq_length=32"),
    (["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_length=36"],
     "2*cp*tp (sequence parallel) = 8"),
    # tiny: 2 KV heads; a2a degree 4 exceeds them
    (["parallel.cp=4", "parallel.cp_comm_type=a2a", "model.spec=te", "data.seq_length=64"], "exceeds or does not divide"),
    (["parallel.cp=4", "parallel.cp_comm_type=a2a+p2p", "parallel.hierarchical_cp_sizes=[4,2]", "model.spec=te",
      "data.seq_length=64"], "hierarchical_cp_sizes=[a2a, p2p] with product cp=4"),
    # the TE spec feeds packed batches as thd, which no TE release runs with hierarchical a2a+p2p
    (["parallel.cp=4", "parallel.cp_comm_type=a2a+p2p", "parallel.hierarchical_cp_sizes=[2,2]", "model.spec=te",
      "data.seq_length=64"], "not supported by any Transformer Engine release"),
    (["parallel.cp=2", "parallel.cp_comm_type=a2a", "model.spec=local", "data.seq_length=64"], "set parallel.cp_comm_type=p2p"),
    (["parallel.cp=2", "parallel.hierarchical_cp_sizes=[1,2]", "data.seq_length=64"], "only used by"),
])
def test_recipe_validation(overrides, fragment):
    with pytest.raises(RecipeError, match=None) as e:
        _recipe(*overrides)
    assert fragment in str(e.value), str(e.value)


def test_valid_layouts_pass():
    _recipe("parallel.cp=2", "data.seq_length=64")
    # TE not installed here: a2a is accepted as written (the installed version is checked at run time);
    # TE's attention with CP needs bf16/fp16 (test_fake_te: the fp32 rule)
    _recipe("parallel.cp=2", "parallel.cp_comm_type=a2a", "model.spec=te", "model.dtype=bf16", "data.seq_length=64")


# Transformer Engine version x comm type x qkv format -> accepted? (thd is what the TE spec feeds;
# the local spec's ring attention is p2p only.) None: TE not installed where the recipe is checked.
TE_TABLE = [
    ((2, 8), "p2p", "te", True), ((2, 20), "p2p", "te", True), (None, "p2p", "local", True),
    ((2, 9), "a2a", "te", False), ((2, 10), "a2a", "te", True), (None, "a2a", "te", True),
    ((2, 17), "all_gather", "te", False), ((2, 18), "all_gather", "te", True),
    ((2, 8), "a2a+p2p", "te", False), ((2, 20), "a2a+p2p", "te", False), (None, "a2a+p2p", "te", False),
    (None, "a2a", "local", False), (None, "all_gather", "local", False), (None, "a2a+p2p", "local", False),
    # auto: not resolved yet (recipe load on a machine other than the one that runs it): deferred
    (None, "a2a+p2p", "auto", True),
]


@pytest.mark.parametrize("te, comm, spec, ok", TE_TABLE)
def test_te_version_comm_type_table_is_what_validate_enforces(te, comm, spec, ok):
    from v2pe_megatron.config import validate
    from v2pe_megatron.parallel.layout import Layout, cp_comm_type_problem

    hier = ["parallel.hierarchical_cp_sizes=[1,2]"] if comm == "a2a+p2p" else []
    recipe = _recipe("parallel.cp=2", f"model.spec={'auto' if spec == 'auto' else 'local'}",
                     "data.seq_length=64", "model.dtype=bf16")  # TE's attention with CP: bf16/fp16 only
    recipe.parallel.cp_comm_type = comm
    recipe.parallel.hierarchical_cp_sizes = [1, 2] if hier else []
    assert (Layout.from_config(recipe.parallel, spec=spec, te=te).qkv_format == "thd") == (spec == "te")
    problem = cp_comm_type_problem(comm, spec, 2, te)
    assert (problem is None) == ok, problem
    import v2pe_megatron.parallel.layout as layout_mod

    original = layout_mod.te_version
    layout_mod.te_version = lambda: te  # what validate() sees as the installed TE
    try:
        if ok:
            validate(recipe, spec=spec)
        else:
            with pytest.raises(RecipeError) as e:
                validate(recipe, spec=spec)
            assert problem in str(e.value)
    finally:
        layout_mod.te_version = original


def test_sub_samples_must_split_into_2cp_chunks():
    from v2pe_megatron.parallel.batch import MicroBatch

    z = torch.zeros(1, 24)
    batch = MicroBatch(tokens=z.long(), labels=z.long(), loss_mask=z, position_ids=z.double(),
                       seq_lens=[torch.tensor([10, 14])])
    with pytest.raises(ValueError, match="not a multiple of 4"):
        split_batch_for_cp(batch, cp_size=2, cp_rank=0)
    batch.seq_lens = [torch.tensor([8, 8])]
    with pytest.raises(ValueError, match="must cover the whole row"):
        split_batch_for_cp(batch, cp_size=2, cp_rank=0)
    with pytest.raises(ValueError, match="qkv_format"):
        packed_seq_params([[8]], qkv_format="bshd")


def _build_cp_models(kinds: list[str]) -> list[str]:
    return [_build_cp_model(k) for k in kinds]


def _build_cp_model(kind: str) -> str:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from v2pe_megatron.model.language import language_transformer_config
    from v2pe_megatron.model.specs import block_spec, layer_spec
    from v2pe_megatron.parallel.layout import Layout
    from v2pe_megatron.runtime.distributed import model_parallel

    recipe = _recipe("parallel.cp=2", "data.seq_length=64")
    with model_parallel(cp=2):
        cfg = language_transformer_config(recipe.model.language, Layout.from_config(recipe.parallel, world_size=2))
        try:
            if kind == "megatron_local":
                block_spec("local", cfg, layer_spec("local", core_attention=DotProductAttention))
            else:
                cfg.cp_comm_type = "a2a"
                block_spec("local", cfg, layer_spec("local"))
        except ValueError as e:
            return str(e)
    return "no error"


@pytest.mark.slow
def test_model_build_rejects_attention_without_cp():
    from v2pe_megatron.testing.distributed import run_distributed

    msgs = run_distributed(_build_cp_models, 2, ["megatron_local", "a2a"], timeout=120)[0]
    assert "DotProductAttention has no context parallelism" in msgs[0], msgs[0]
    assert "set parallel.cp_comm_type=p2p" in msgs[1], msgs[1]


def test_gpu_extra_and_constraints_pin_the_transformer_engine_releases_the_table_covers():
    """pyproject's `gpu` extra, constraints.txt and TE_VERSION_RANGE name the same releases, and the
    extra asks for TE's core library built for the CUDA major of the torch that constraints.txt pins."""
    import re
    import tomllib
    from pathlib import Path

    from v2pe_megatron.parallel.layout import TE_VERSION_RANGE

    root = Path(__file__).resolve().parents[2]
    first, last = TE_VERSION_RANGE
    want = (first, (last[0], last[1] + 1))

    def bounds(req: str):
        lo = tuple(int(x) for x in re.search(r">=(\d+)\.(\d+)", req).groups())
        hi = tuple(int(x) for x in re.search(r"<(\d+)\.(\d+)", req).groups())
        return lo, hi

    meta = tomllib.loads((root / "pyproject.toml").read_text())
    (req,) = [r for r in meta["project"]["optional-dependencies"]["gpu"] if r.startswith("transformer-engine")]
    assert bounds(req) == want, (req, TE_VERSION_RANGE)
    lines = [ln.strip() for ln in (root / "constraints.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    cuda = int(next(ln for ln in lines if ln.startswith("cuda-toolkit==")).split("==")[1].split(".")[0])
    extras = set(re.search(r"\[([^\]]*)\]", req).group(1).replace(" ", "").replace("-", "_").split(","))
    assert extras == {"pytorch", f"core_cu{cuda}"}, (req, cuda)
    te = {ln.split(">=")[0]: bounds(ln) for ln in lines if ln.startswith("transformer-engine")}
    assert te == {"transformer-engine": want, f"transformer-engine-cu{cuda}": want,
                  "transformer-engine-torch": want}, te


@pytest.mark.parametrize("overrides, world, fragment", [
    (["parallel.virtual_pp=2"], None, "needs parallel.pp > 1"),
    (["parallel.virtual_pp=0"], None, "parallel.virtual_pp=0 must be >= 1"),
    # tiny: 4 LLM layers; pp*vpp = 2*4 = 8 does not divide them
    (["parallel.pp=2", "parallel.virtual_pp=4"], None, "pp*virtual_pp = 2*4 must divide model.language.num_layers=4"),
    (["parallel.pp=2", "parallel.virtual_pp=2", "parallel.pp_layers=[1,3]"], None, "remove parallel.pp_layers"),
    # megatron's interleaved schedule: micro-batches per step a multiple of pp (here 3 of 1 sample, dp 1)
    (["parallel.pp=2", "parallel.virtual_pp=2", "data.micro_batch_size=1", "data.global_batch_size=3"], 2,
     "to be a multiple of parallel.pp=2; use data.global_batch_size=4"),
])
def test_virtual_pipeline_rules(overrides, world, fragment):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, BASE + overrides, validate_for_world_size=world)
    assert fragment in str(e.value), str(e.value)


def test_virtual_pipeline_layout_passes():
    load_recipe(None, BASE + ["parallel.pp=2", "parallel.virtual_pp=2", "data.global_batch_size=2",
                              "data.micro_batch_size=1"], validate_for_world_size=2)
