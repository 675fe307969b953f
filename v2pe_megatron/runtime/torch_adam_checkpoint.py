"""megatron-core's DistributedOptimizer checkpoints torch's Adam wrongly; this fixes it.

megatron-core 0.19 builds Transformer Engine's or apex's FusedAdam when either imports, and otherwise
falls back to ``torch.optim.Adam``/``AdamW`` (``megatron.core.optimizer.USING_PYTORCH_OPTIMIZER``).
That happens on a CPU, but also on a GPU machine installed without the ``gpu`` extra and without
apex. With torch's Adam under the DistributedOptimizer, megatron's checkpoint code

(a) reads ``step`` from every parameter's Adam state, but megatron's ``init_state_fn`` creates
    ``exp_avg``/``exp_avg_sq`` only, so building the sharded dict to load into (or saving before the
    first step) fails; and loading the parameter states wants a source for the destination's ``step``
    tensor, which the checkpoint keeps per param group, not per parameter;
(b) on load gives every parameter the *same* ``step`` tensor, which torch's Adam then increments once
    per parameter per step: after a resume, bias correction is silently wrong and the run diverges
    from the one that was never interrupted (``tests/training/test_resume.py``);
(c) copies the loaded states in place into leaves that require grad outside ``no_grad``.

The patch gives each state its own ``step`` tensor and runs the copies under ``no_grad``. It acts only
on DistributedOptimizers whose inner optimizer is torch's Adam/AdamW, so leaving it active next to a
fused Adam changes nothing. :func:`v2pe_megatron.training.engine.build_optimizer` activates it when
:func:`needed` says the optimizer it built is affected.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

from v2pe_megatron.runtime.patching import PatchSet

_patches = PatchSet(__name__)
_TORCH_ADAM = (torch.optim.Adam, torch.optim.AdamW)  # AdamW is not a subclass of Adam


def _distributed_optimizers(optimizer) -> Iterator[Any]:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    # ChainedOptimizer.optimizer asserts a single member: walk its members instead.
    for sub in getattr(optimizer, "chained_optimizers", None) or ():
        yield from _distributed_optimizers(sub)
    if isinstance(optimizer, DistributedOptimizer):
        yield optimizer


def _uses_torch_adam(dist_opt) -> bool:
    return isinstance(getattr(dist_opt, "optimizer", None), _TORCH_ADAM)


def needed(optimizer: Optional[Any] = None) -> bool:
    """Whether megatron-core's distributed optimizer runs on torch's Adam here.

    With ``optimizer`` (what ``get_megatron_optimizer`` returned): whether any DistributedOptimizer in
    it wraps a ``torch.optim.Adam``/``AdamW``, which also covers paths that do not follow the
    module-level choice. Without: megatron-core's own record of falling back to torch's optimizers.
    """
    if optimizer is not None:
        return any(_uses_torch_adam(d) for d in _distributed_optimizers(optimizer))
    from megatron.core import optimizer as mopt

    flag = getattr(mopt, "USING_PYTORCH_OPTIMIZER", None)
    if flag is None:  # renamed upstream: judge by the class megatron would build
        return isinstance(getattr(mopt, "Adam", None), type) and issubclass(mopt.Adam, _TORCH_ADAM)
    return bool(flag)


@_patches.patch
def distributed_optimizer_checkpoint() -> None:
    from megatron.core.optimizer import distrib_optimizer as dopt

    cls = dopt.DistributedOptimizer
    orig_set_states = cls._set_main_param_and_optimizer_states
    orig_load_state_dict = cls.load_state_dict
    orig_state_dict = cls.state_dict

    def state_dict(self):
        if _uses_torch_adam(self):  # (a)
            for st in self.optimizer.state.values():
                if st and "step" not in st:
                    st["step"] = torch.tensor(0.0)
        return orig_state_dict(self)

    def set_states(self, model_param, tensors):
        if not _uses_torch_adam(self):
            return orig_set_states(self, model_param, tensors)
        # (a) megatron restores `step` separately; a non-tensor makes it skip the key. (c) no_grad.
        tensors = dict(tensors)
        tensors.setdefault("step", None)
        with torch.no_grad():
            return orig_set_states(self, model_param, tensors)

    def load_state_dict(self, state_dict):
        out = orig_load_state_dict(self, state_dict)
        if _uses_torch_adam(self):
            _unshare_step_tensors(self.optimizer)  # (b)
        return out

    _patches.set(cls, "_set_main_param_and_optimizer_states", set_states)
    _patches.set(cls, "load_state_dict", load_state_dict)
    _patches.set(cls, "state_dict", state_dict)


def _unshare_step_tensors(inner: torch.optim.Optimizer) -> None:
    """(b) Give every parameter's Adam state its own ``step`` tensor (values kept)."""
    seen: set[int] = set()
    for state in inner.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.detach().clone()
            seen.add(id(state["step"]))


PATCHES = _patches.patches


def activate() -> None:
    """Apply the fix (idempotent); harmless where megatron uses a fused Adam."""
    _patches.activate()


def is_active() -> bool:
    return _patches.is_active()


def deactivate() -> None:
    """Undo the fix (the tests use this to show the resume it prevents from diverging)."""
    _patches.deactivate()
