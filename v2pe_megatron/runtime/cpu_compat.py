"""The few patches megatron-core 0.19 needs to run on a machine without CUDA. CPU only.

megatron-core is written for GPUs and hard-codes CUDA in a handful of places. Everything here exists
so that the *same* TP x PP x CP x DP code paths run on gloo in CI; nothing changes a numerical
result. :func:`activate` is called by the runtime only when the process has no CUDA (it refuses to
run otherwise), and every patch has a test in ``tests/runtime/test_cpu_compat.py`` that shows the failure it
prevents.

Patches (each a named function below):

1. ``cuda_tensor_factories``: ``torch.empty(..., device=torch.cuda.current_device())`` and friends
   (parameter and buffer allocation, grad buffers, p2p receive buffers) are redirected to the CPU;
   ``Tensor.cuda()`` returns the tensor; ``torch.cuda.current_device()`` answers 0.
2. ``cuda_runtime_stubs``: ``torch.cuda.synchronize/current_stream/Stream/Event`` and friends become
   no-ops (the schedules and the distributed optimizer call them between steps).
3. ``tensor_type_names``: ``Tensor.type()`` reports ``torch.cuda.*Tensor`` names for CPU tensors;
   grad clipping and the distributed optimizer assert on those names.
4. ``rng_tracker_on_cpu``: the tensor-parallel RNG tracker stores and restores CUDA generator states;
   here it uses the CPU generator, so forked regions (TP-sharded init, dropout) stay reproducible.

Not here: the distributed optimizer's checkpoint fix for torch's Adam, which a GPU machine without
Transformer Engine or apex needs as well (:mod:`v2pe_megatron.runtime.torch_adam_checkpoint`).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

from v2pe_megatron.runtime.patching import PatchSet

log = logging.getLogger(__name__)

_patches = PatchSet(__name__)
_set = _patches.set

_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint", "randperm",
              "empty_strided", "as_tensor", "linspace", "eye", "zeros_like", "ones_like", "empty_like",
              "full_like", "rand_like", "randn_like")


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_device_kwarg(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)  # pinning needs a CUDA driver
        return fn(*args, **kwargs)

    wrapper.__v2pe_cpu_compat__ = True
    return wrapper


@_patches.patch
def cuda_tensor_factories() -> None:
    # `with torch.device(...)` (used e.g. by transformers to build models on "meta") recognizes
    # factories by identity in a set it builds lazily, once. Build it from the *original* functions
    # before wrapping them, or the context silently stops applying to them.
    try:
        from torch.utils._device import _device_constructors

        _device_constructors()
    except ImportError:  # private API: without it only the meta-device context is affected
        log.warning("torch.utils._device._device_constructors is gone; `with torch.device(...)` may "
                    "not apply to patched factories")
    for name in _FACTORIES:
        fn = getattr(torch, name)
        if not getattr(fn, "__v2pe_cpu_compat__", False):
            _set(torch, name, _cpu_device_kwarg(fn))

    orig_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and _is_cuda(args[0]) and not isinstance(args[0], bool):
            args = ("cpu",) + args[1:]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("non_blocking", None)
        return orig_to(self, *args, **kwargs)

    _set(torch.Tensor, "to", to)
    _set(torch.Tensor, "cuda", lambda self, *a, **k: self)
    _set(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
    _set(torch.cuda, "current_device", lambda: 0)
    _set(torch.cuda, "device_count", lambda: 0)


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()


class _NullEvent(_NullStream):
    def record(self, *args, **kwargs):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


@_patches.patch
def cuda_runtime_stubs() -> None:
    _set(torch.cuda, "synchronize", lambda *a, **k: None)
    _set(torch.cuda, "current_stream", lambda *a, **k: _NullStream())
    _set(torch.cuda, "default_stream", lambda *a, **k: _NullStream())
    _set(torch.cuda, "Stream", _NullStream)
    _set(torch.cuda, "Event", _NullEvent)
    _set(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    _set(torch.cuda, "empty_cache", lambda: None)
    _set(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    _set(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    _set(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)


_CPU_TO_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
}


@_patches.patch
def tensor_type_names() -> None:
    orig_type = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            name = orig_type(self)
            return _CPU_TO_CUDA_TYPE.get(name, name)
        if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
            dtype = dtype.replace("torch.cuda.", "torch.")
        return orig_type(self, dtype, non_blocking, **kwargs)

    _set(torch.Tensor, "type", type_)


@_patches.patch
def rng_tracker_on_cpu() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device=None, clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    # The tracker's fork warns when the CPU generator moves inside a forked region; here the forked
    # state *is* the CPU generator, so the warning would fire on every dropout/init and mean nothing.
    logging.getLogger(mrandom.__name__).addFilter(
        lambda rec: "CPU RNG state changed within GPU RNG context" not in rec.getMessage())
    _set(mrandom, "_get_cuda_rng_state", get_state)
    _set(mrandom, "_set_cuda_rng_state", set_state)
    _set(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    _set(torch.cuda, "set_rng_state", lambda state, device="cuda": torch.set_rng_state(state))
    # torch.manual_seed itself calls torch.cuda.manual_seed_all (lazily, harmless here): seed the
    # CPU generator directly to avoid recursing through it.
    _set(torch.cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))


PATCHES = _patches.patches


def activate(only: tuple[str, ...] | None = None) -> None:
    """Apply the patches (idempotent). Refuses to run where CUDA is available."""
    if torch.cuda.is_available():
        raise RuntimeError("v2pe_megatron.runtime.cpu_compat must not be activated on a CUDA machine")
    _patches.activate(only)


def is_active(name: str | None = None) -> bool:
    return _patches.is_active(name)


def deactivate(*names: str) -> None:
    """Undo the named patches, or all of them (the tests use this to show what each one prevents)."""
    _patches.deactivate(*names)
