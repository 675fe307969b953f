"""``build_model`` from a plain script (no launcher, no process group, no megatron state): the README's
model-API snippet. It sets up a 1-rank group and megatron state itself for a layout without model
parallelism, keeps them as long as the model, and refuses a model-parallel layout with the fix."""

from __future__ import annotations

import gc

import pytest
import torch.distributed as dist
from megatron.core import parallel_state as ps


@pytest.fixture
def bare_process():
    """This test process as a plain script sees it: no group, no megatron state (before and after)."""
    assert not dist.is_initialized() and not ps.model_parallel_is_initialized(), \
        "an earlier test left a process group or megatron state behind"
    yield
    assert not dist.is_initialized() and not ps.model_parallel_is_initialized()


def test_build_model_sets_up_and_releases_its_own_state(bare_process):
    from v2pe_megatron.config import validate
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import resolve_spec
    from v2pe_megatron.testing.tiny import tiny_recipe

    recipe = tiny_recipe("launcher.nproc_per_node=2", "data.global_batch_size=2")
    layout = validate(recipe, world_size=2, spec=resolve_spec(recipe.model.spec, recipe.model.dtype))
    assert layout.dp == 2  # one data-parallel replica of a 2-rank layout: the same model on every rank
    model = build_model(recipe.model, layout)
    assert ps.model_parallel_is_initialized() and dist.get_world_size() == 1
    assert model.pre_process and model.post_process
    assert model.freeze(projector=True) and not any(p.requires_grad for p in model.projector.parameters())
    model.release_process_group()
    assert not dist.is_initialized() and not ps.model_parallel_is_initialized()

    # also released when the model is collected
    model = build_model(recipe.model, layout)
    del model
    gc.collect()
    assert not dist.is_initialized() and not ps.model_parallel_is_initialized()


def test_model_parallel_layout_needs_its_ranks(bare_process):
    from v2pe_megatron.config import validate
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import resolve_spec
    from v2pe_megatron.testing.tiny import tiny_recipe

    recipe = tiny_recipe("parallel.tp=2", "launcher.nproc_per_node=2")
    layout = validate(recipe, world_size=2, spec=resolve_spec(recipe.model.spec, recipe.model.dtype))
    with pytest.raises(RuntimeError, match=r"tp=2 pp=1 cp=1.*initialize_model_parallel\(2, 1, 1\)"):
        build_model(recipe.model, layout)


def test_existing_state_is_used_and_left_alone(bare_process):
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing.tiny import layout_of, tiny_recipe

    recipe = tiny_recipe()
    with model_parallel():
        model = build_model(recipe.model, layout_of(recipe))
        assert not hasattr(model, "release_process_group")  # the caller's state, not the model's
        del model
        gc.collect()
        assert ps.model_parallel_is_initialized()
