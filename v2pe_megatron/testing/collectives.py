"""Catch, on CPU, the tensor collectives that would get a CPU tensor on a GPU rank. Test-only.

On GPU ranks the process groups are NCCL, which takes CUDA tensors only: ``dist.all_reduce(
torch.tensor([1.0]))`` fails there with "No backend type associated with device type cpu". CI runs on
CPU with gloo, where every tensor is on "cpu" and the same call passes, so the bug would only show
on the first GPU run. Inside ``with check_collective_devices():``

* tensors are *marked* when they would be on the CPU on a GPU rank: the result of a torch call
  that has no tensor input (``torch.tensor/zeros/ones/empty/full/arange/...``) and no ``device=``,
  of ``torch.from_numpy``/``torch.frombuffer``, of ``Tensor.cpu()``, and of any torch operation with
  a marked input (``torch.tensor([1]).double() * 2`` is marked; in-place operations and ``out=``
  keep their target's mark, since they do not move it);
* an explicit device clears the mark: ``device=...``, ``.to(device)``, ``.cuda()`` (so model
  parameters and megatron's buffers, made on ``torch.cuda.current_device()``, are unmarked);
* torch.distributed's tensor collectives (all_reduce, all_gather, all_gather_into_tensor,
  reduce_scatter_tensor, broadcast, reduce, all_to_all_single, send/recv/isend/irecv,
  batch_isend_irecv and their older variants) raise an AssertionError naming the collective, the
  call that made the tensor and where it was called, when a marked tensor reaches them on a group
  that is not one of megatron's gloo groups (``parallel_state``'s ``*_GLOO`` groups, where CPU
  tensors are right).

Limitations (what it does not catch):

* ``cpu_compat`` rewrites ``device="cuda"`` into ``"cpu"`` before torch sees it, so every explicit
  device, ``"cpu"`` included, counts as the rank's device (as does ``device=t.device`` of a marked
  ``t``): the checker catches tensors built WITHOUT a device, not ones put on the CPU on purpose.
* Legacy constructors (``torch.Tensor(data)``, ``torch.LongTensor(...)``), ``nn.Parameter`` and
  tensors made in C++ (autograd's gradients) are not seen, and count as on the device.
* Only the thread that entered the context is tracked (torch function modes are per thread).
* Object collectives (``all_gather_object``, ``broadcast_object_list``, ...) choose their device
  themselves and are not checked, nor are the tensor collectives they call.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import threading
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakTensorKeyDictionary

from v2pe_megatron.runtime import cpu_compat

__all__ = ["check_collective_devices", "CollectiveDeviceChecker"]

TENSOR_COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor",
                      "_all_gather_base", "all_gather_coalesced", "reduce_scatter", "reduce_scatter_tensor",
                      "_reduce_scatter_base", "broadcast", "reduce", "gather", "scatter", "all_to_all",
                      "all_to_all_single", "send", "recv", "isend", "irecv", "batch_isend_irecv")
OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list",
                      "send_object_list", "recv_object_list")

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_SKIP_FILES = {os.path.abspath(__file__), os.path.abspath(cpu_compat.__file__)}
_DATA = torch._C.TensorBase.data
_ACTIVE: Optional["CollectiveDeviceChecker"] = None
_LOCAL = threading.local()  # .exempt: depth of object collectives on this thread


def _caller() -> str:
    """``file:line in function`` of the first frame outside torch and this checker."""
    f = sys._getframe(1)
    while f is not None and (f.f_code.co_filename.startswith(_TORCH_DIR) or f.f_code.co_filename in _SKIP_FILES):
        f = f.f_back
    if f is None:
        return "<unknown>"
    path = f.f_code.co_filename
    for anchor in ("site-packages" + os.sep, os.getcwd() + os.sep):
        if anchor in path:
            path = path.split(anchor, 1)[1]
            break
    return f"{path}:{f.f_lineno} in {f.f_code.co_name}"


class _Origin:
    __slots__ = ("made_by", "where", "via")

    def __init__(self, made_by: str, where: str, via: tuple[str, ...] = ()) -> None:
        self.made_by, self.where, self.via = made_by, where, via

    def derived(self, op: str) -> "_Origin":
        via = self.via if len(self.via) >= 4 else self.via + (op,)
        return _Origin(self.made_by, self.where, via)

    def __str__(self) -> str:
        s = f"made by {self.made_by} at {self.where}"
        return s + (f", then through {' -> '.join(self.via)}" if self.via else "")


def _tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 2 and isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x, depth + 1)


def _is_method(func, name: str) -> bool:
    # torch hands the mode torch.Tensor's attribute, which cpu_compat may have replaced
    return func is getattr(torch.Tensor, name) or func is getattr(torch._C.TensorBase, name)


def _explicit_device(func, args: tuple, kwargs: dict) -> bool:
    if kwargs.get("device") is not None or _is_method(func, "cuda"):
        return True
    if _is_method(func, "to") and len(args) > 1:
        a = args[1]
        return isinstance(a, (str, torch.device)) or (isinstance(a, int) and not isinstance(a, bool))
    return False


class CollectiveDeviceChecker(TorchFunctionMode):
    """The torch function mode that marks tensors; use it through :func:`check_collective_devices`."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: WeakTensorKeyDictionary = WeakTensorKeyDictionary()

    def mark(self, t: torch.Tensor, made_by: str) -> torch.Tensor:
        self.marks[t] = _Origin(made_by, _caller())
        return t

    def _alias(self, t: torch.Tensor) -> torch.Tensor:
        # On CPU a "move" returns the tensor itself; on a GPU it is a new tensor. A view stands in
        # for it, so that marking or clearing the result leaves the source's mark as it is.
        with torch._C.DisableTorchFunction():
            return t.view_as(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "__self__", None) is _DATA and func.__name__ == "__set__":  # p.data = x: p goes where x is
            self._set(args[0], self.marks.get(args[1]))
            return out
        inputs = [t for a in (*args, *kwargs.values()) for t in _tensors(a)]
        results = list(_tensors(out))
        if not results:
            return out
        name = getattr(func, "__name__", str(func))
        if _is_method(func, "cpu"):
            if out is args[0]:
                out = self._alias(out)
            self.marks[out] = _Origin("Tensor.cpu()", _caller())
            return out
        if _is_method(func, "to") and len(args) > 1 and isinstance(args[1], torch.Tensor):
            if out is args[0] and self.marks.get(out) is not self.marks.get(args[1]):
                out = self._alias(out)
            self._set(out, self.marks.get(args[1]))  # .to(other): where other is
            return out
        if _explicit_device(func, args, kwargs):
            if inputs and out is inputs[0] and inputs[0] in self.marks:
                out = self._alias(out)
                results = [out]
            for r in results:
                if not any(r is i for i in inputs):
                    self.marks.pop(r, None)
            return out
        makes = name in ("tensor", "as_tensor", "asarray") and not (args and isinstance(args[0], torch.Tensor))
        if not inputs or makes:  # torch.tensor([t]) copies to the host even if t is on the device
            origin = _Origin(f"torch.{name}() without a device", _caller())
        else:
            src = next((self.marks[i] for i in inputs if i in self.marks), None) if len(self.marks) else None
            if src is None:
                return out
            origin = src.derived(name)
        for r in results:
            if not any(r is i for i in inputs):  # in place / out=: the target stays where it is
                self.marks[r] = origin
        return out

    def _set(self, t: torch.Tensor, origin: Optional[_Origin]) -> None:
        if origin is None:
            self.marks.pop(t, None)
        else:
            self.marks[t] = origin

    # -- the collectives' side ------------------------------------------------------------------

    def check(self, collective: str, tensors: list[torch.Tensor], group) -> None:
        if getattr(_LOCAL, "exempt", 0) or not len(self.marks):
            return
        bad = [(t, self.marks[t]) for t in tensors if isinstance(t, torch.Tensor) and t in self.marks]
        if not bad or _is_megatron_gloo(group):
            return
        t, origin = bad[0]
        where = "the default group" if group is None else f"group {_group_name(group)!r}"
        raise AssertionError(
            f"dist.{collective} on {where} got a {tuple(t.shape)} {t.dtype} tensor that would be on the CPU "
            f"on a GPU rank: it was {origin}. NCCL groups fail on it ('No backend type associated with "
            f"device type cpu'). Make it with device=v2pe_megatron.runtime.distributed.device() (or move it "
            f"there), or use one of megatron's *_gloo groups. The collective was called at {_caller()}.")


def _group_name(group) -> str:
    for attr in ("group_desc", "group_name"):
        with contextlib.suppress(Exception):
            v = getattr(group, attr)
            if v:
                return str(v)
    return repr(group)


def _is_megatron_gloo(group) -> bool:
    if group is None:
        return False
    try:
        from megatron.core import parallel_state as ps
    except ImportError:
        return False
    for name, v in vars(ps).items():
        if "GLOO" in name and v is not None:
            if any(g is group for g in (v if isinstance(v, (list, tuple)) else (v,))):
                return True
    return False


# -- wrappers, made once: modules imported inside the context may keep them, so they stay inert
#    outside it ---------------------------------------------------------------------------------

_ORIGINALS = {n: getattr(c10d, n) for n in TENSOR_COLLECTIVES + OBJECT_COLLECTIVES if hasattr(c10d, n)}


def _checked(name: str, fn):
    if name == "batch_isend_irecv":
        @functools.wraps(fn)
        def wrapper(p2p_op_list, *args, **kwargs):
            if _ACTIVE is not None:
                for op in p2p_op_list:
                    _ACTIVE.check(name, [op.tensor], op.group)
            return fn(p2p_op_list, *args, **kwargs)
        return wrapper

    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _ACTIVE is not None:
            bound = sig.bind_partial(*args, **kwargs).arguments
            tensors = [t for v in bound.values() for t in _tensors(v)]
            _ACTIVE.check(name, tensors, bound.get("group"))
        return fn(*args, **kwargs)
    return wrapper


def _exempt(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _LOCAL.exempt = getattr(_LOCAL, "exempt", 0) + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _LOCAL.exempt -= 1
    return wrapper


_WRAPPERS = {n: (_exempt(f) if n in OBJECT_COLLECTIVES else _checked(n, f)) for n, f in _ORIGINALS.items()}
_BY_ID = {id(f): n for n, f in _ORIGINALS.items()}


def _patch_modules() -> list[tuple[dict, str, Any]]:
    """Replace every module-level reference to a collective (``torch.distributed.all_reduce``,
    ``c10d``'s own globals so that P2POp's ``op in (isend, irecv)`` check agrees, and aliases such
    as megatron's ``dist_all_gather_func``)."""
    undo = []
    for mod in list(sys.modules.values()):
        d = getattr(mod, "__dict__", None)
        if not isinstance(d, dict):
            continue
        for k, v in list(d.items()):
            n = _BY_ID.get(id(v))
            if n is not None and v is _ORIGINALS[n]:
                undo.append((d, k, v))
                d[k] = _WRAPPERS[n]
    return undo


def _marking_factory(checker: CollectiveDeviceChecker, fn, label: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return checker.mark(fn(*args, **kwargs), label)
    return wrapper


@contextlib.contextmanager
def check_collective_devices() -> Iterator[CollectiveDeviceChecker]:
    """Within the block, a tensor collective on a tensor made without a device raises AssertionError
    (see the module docstring for what is tracked and what is not). Not re-entrant."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("check_collective_devices() is already active")
    checker = CollectiveDeviceChecker()
    undo = _patch_modules()
    # Not torch functions (the mode never sees them): wrap them for the duration.
    for name in ("from_numpy", "frombuffer"):
        undo.append((torch.__dict__, name, getattr(torch, name)))
        setattr(torch, name, _marking_factory(checker, getattr(torch, name), f"torch.{name}()"))
    cuda = torch.Tensor.cuda  # cpu_compat's no-op version returns the tensor itself, unseen by the mode

    @functools.wraps(cuda)
    def cuda_(self, *args, **kwargs):
        out = cuda(self, *args, **kwargs)
        if out is self and self in checker.marks:
            out = checker._alias(out)
        checker.marks.pop(out, None)
        return out

    own_cuda = "cuda" in vars(torch.Tensor)
    torch.Tensor.cuda = cuda_
    _ACTIVE = checker
    try:
        with checker:
            yield checker
    finally:
        _ACTIVE = None
        if own_cuda:
            torch.Tensor.cuda = cuda
        else:
            del torch.Tensor.cuda
        for d, k, v in reversed(undo):
            d[k] = v
