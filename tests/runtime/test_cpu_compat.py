"""Each CPU patch exists because megatron-core fails without it: for every patch, the same tiny
training step fails with that patch alone undone and succeeds with it back. (The distributed
optimizer's checkpoint fix for torch's Adam is not a CPU patch: see test_foundation_resume.py.)"""

from __future__ import annotations

import pytest
import torch

from v2pe_megatron.runtime import cpu_compat
from v2pe_megatron.testing.distributed import run_distributed


def _tiny_step(distopt: bool) -> float:
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing import tiny
    from v2pe_megatron.training.engine import build_optimizer, train_step, wrap_ddp

    recipe = tiny.tiny_recipe("optimizer.clip_grad=1.0", "optimizer.name=adam",
                              f"parallel.use_distributed_optimizer={distopt}")
    with model_parallel(1, 1, seed=1):
        model = tiny.build_language_model(recipe)
        ddp = wrap_ddp(model, model.config, use_distributed_optimizer=distopt)
        opt = build_optimizer(recipe.optimizer, [ddp], params_dtype=torch.float32, use_distributed_optimizer=distopt)
        batches = tiny.synthetic_lm_batches(2, micro_batch_size=1, seq_length=16, vocab_size=512)
        res = train_step([ddp], opt, tiny.lm_forward_step, iter(batches), num_microbatches=2, seq_length=16,
                         micro_batch_size=1)
        return res.grad_norm


def _without(name: str, distopt: bool) -> dict:
    cpu_compat.deactivate(name)
    try:
        _tiny_step(distopt)
        failure = None
    except Exception as e:  # noqa: BLE001 - the failure is what we report
        failure = f"{type(e).__name__}: {e}"
    cpu_compat.activate()
    grad_norm = _tiny_step(distopt)
    return {"failure": failure, "grad_norm": grad_norm}


@pytest.mark.slow
@pytest.mark.parametrize("name,distopt", [
    ("cuda_tensor_factories", False),
    ("cuda_runtime_stubs", True),
    ("tensor_type_names", False),
    ("rng_tracker_on_cpu", False),
])
def test_each_patch_is_needed(name, distopt):
    out = run_distributed(_without, 1, name, distopt)[0]
    assert out["failure"] is not None, f"megatron-core ran without {name}: the patch may be obsolete"
    assert out["grad_norm"] is not None and out["grad_norm"] > 0


def test_refuses_to_activate_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="must not be activated on a CUDA machine"):
        cpu_compat.activate()


def test_torch_adam_checkpoint_fix_is_not_a_cpu_patch():
    """GPU machines without TE/apex need it too, so "no CUDA" must not be what switches it on."""
    from v2pe_megatron.runtime import torch_adam_checkpoint

    assert "distributed_optimizer_checkpoint" not in cpu_compat.PATCHES
    assert "distributed_optimizer_checkpoint" in torch_adam_checkpoint.PATCHES


def test_patches_are_listed_in_the_module_docstring():
    for name in cpu_compat.PATCHES:
        assert f"``{name}``" in cpu_compat.__doc__


def _device_context_after_activation() -> dict:
    from v2pe_megatron.runtime import cpu_compat as cc

    assert cc.is_active("cuda_tensor_factories")
    with torch.device("meta"):
        made = {n: getattr(torch, n)(*a).is_meta for n, a in
                (("tensor", ([1.0],)), ("zeros", (2,)), ("arange", (3,)), ("full", ((2,), 1.0)))}
    return made


@pytest.mark.slow
def test_device_context_still_applies_to_patched_factories():
    """transformers builds models under ``with torch.device("meta")``; a factory the context no longer
    recognizes silently makes CPU tensors there (seen: garbage rotary buffers in a loaded model)."""
    made = run_distributed(_device_context_after_activation, 1)[0]
    assert all(made.values()), made


def test_patch_set_undoes_each_patch_on_its_own():
    from types import SimpleNamespace

    from v2pe_megatron.runtime.patching import PatchSet

    target = SimpleNamespace(a=1)
    ps = PatchSet("test")

    @ps.patch
    def one():
        ps.set(target, "a", 10)
        ps.set(target, "new", 20)

    @ps.patch
    def broken():
        ps.set(target, "a", 99)
        raise ValueError("half applied")

    ps.activate(["one"])
    assert (target.a, target.new, ps.is_active("one")) == (10, 20, True)
    with pytest.raises(ValueError):
        ps.activate(["broken"])
    assert target.a == 10 and not ps.is_active("broken")  # the failed patch left nothing behind
    ps.deactivate("one")
    assert target.a == 1 and not hasattr(target, "new") and not ps.is_active()
    with pytest.raises(KeyError, match="no patch named"):
        ps.activate(["typo"])
