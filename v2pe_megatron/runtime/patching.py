"""Named, individually reversible monkey patches of third-party code.

Each patch is a function that changes attributes only through :meth:`PatchSet.set`, so that it can be
undone on its own: the tests undo one patch at a time to show the failure it prevents.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional

log = logging.getLogger(__name__)

_MISSING = object()  # the attribute did not exist before the patch: undoing deletes it


class PatchSet:
    """An ordered set of named patches with their undo records.

    ``@patches.patch`` registers a function under its name; inside it, ``patches.set(obj, attr, value)``
    replaces an attribute and remembers the original for :meth:`deactivate`.
    """

    def __init__(self, owner: str):
        self.owner = owner  # for log messages
        self.patches: dict[str, Callable[[], None]] = {}
        self._active: list[str] = []  # in activation order, so undoing everything runs in reverse
        self._originals: dict[str, list[tuple[object, str, object]]] = {}
        self._current: list[str] = []  # the patch being applied

    def patch(self, fn: Callable[[], None]) -> Callable[[], None]:
        self.patches[fn.__name__] = fn
        return fn

    def set(self, obj, name: str, value) -> None:
        if not self._current:
            raise RuntimeError(f"{self.owner}: set({name!r}) outside a patch would not be undoable")
        self._originals.setdefault(self._current[-1], []).append((obj, name, getattr(obj, name, _MISSING)))
        setattr(obj, name, value)

    def activate(self, only: Optional[Iterable[str]] = None) -> None:
        """Apply the named patches (all by default) that are not applied yet."""
        only = None if only is None else set(only)
        unknown = (only or set()) - set(self.patches)
        if unknown:
            raise KeyError(f"{self.owner}: no patch named {sorted(unknown)}; known: {list(self.patches)}")
        for name, fn in self.patches.items():
            if (only is None or name in only) and name not in self._active:
                self._current.append(name)
                try:
                    fn()
                except BaseException:
                    self._current.pop()
                    self._undo(name)  # a half-applied patch must not stay behind
                    raise
                self._current.pop()
                self._active.append(name)
        log.debug("%s active: %s", self.owner, self._active)

    def deactivate(self, *names: str) -> None:
        """Undo the named patches, or all of them (latest first)."""
        for name in names or tuple(reversed(self._active)):
            self._undo(name)

    def is_active(self, name: Optional[str] = None) -> bool:
        return bool(self._active) if name is None else name in self._active

    def _undo(self, name: str) -> None:
        for obj, attr, orig in reversed(self._originals.pop(name, [])):
            if orig is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, orig)
        if name in self._active:
            self._active.remove(name)
