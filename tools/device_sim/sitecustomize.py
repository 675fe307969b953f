"""Hide the locally installed distributions that the GPU machine lacks (used by
``tools/device_check.sh --dry-run`` through PYTHONPATH, so child processes inherit it).

``V2PE_DEVICE_SIM`` names the image's package list (tools/device_image_packages.txt);
``V2PE_DEVICE_SIM_ALLOW`` adds distributions that travel as wheels. What an allowed distribution
requires (its requirements without extras, transitively) is allowed too: the image's copy of a
package brings what it needs, and this machine's copy may be a newer version that needs other
packages (huggingface-hub 1.x here needs httpx2, the image's older one does not). Every other
distribution of this interpreter's environment becomes unimportable: the path finder answers "not found" for its modules
(so ``import`` raises ModuleNotFoundError and ``importlib.util.find_spec`` returns None, as they would
there). A module shared by allowed and hidden distributions (the ``nvidia`` namespace) is hidden one
level down (``nvidia.dali``), where they part.
"""

from __future__ import annotations

import os
import re
import sys


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _with_requirements(allowed: set[str]) -> set[str]:
    """``allowed`` and what they require here (no extras; markers evaluated), transitively."""
    import importlib.metadata as md

    from packaging.requirements import InvalidRequirement, Requirement

    out, todo = set(allowed), list(allowed)
    while todo:
        try:
            reqs = md.requires(todo.pop()) or []
        except md.PackageNotFoundError:
            continue
        for text in reqs:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = _norm(req.name)
            if name not in out:
                out.add(name)
                todo.append(name)
    return out


def _hidden_modules(allowed: set[str]) -> set[str]:
    import importlib.metadata as md

    owners: dict[str, set[str]] = {}  # module path ("nvidia", "nvidia.dali") -> distributions
    for dist in md.distributions():
        name = _norm(dist.metadata["Name"] or "")
        for f in dist.files or ():
            parts = f.parts
            if not parts or parts[0].endswith((".dist-info", ".data")) or parts[0] in ("..", "__pycache__"):
                continue
            top = parts[0].removesuffix(".py")
            if "." in top or top.endswith((".pth", ".so")):
                continue
            owners.setdefault(top, set()).add(name)
            if len(parts) > 2 and parts[1] != "__pycache__":
                owners.setdefault(f"{top}.{parts[1].removesuffix('.py')}", set()).add(name)
    hidden = set()
    for mod, dists in owners.items():
        if dists & allowed:
            continue
        parent = mod.rpartition(".")[0]
        if parent and parent in hidden:
            continue
        if not parent or owners.get(parent, set()) & allowed:
            hidden.add(mod)
    return hidden


def _install() -> None:
    listing = os.environ.get("V2PE_DEVICE_SIM")
    if not listing:
        return
    from importlib.machinery import PathFinder

    with open(listing) as f:
        allowed = {_norm(ln.strip()) for ln in f if ln.strip() and not ln.startswith("#")}
    allowed |= {_norm(n) for n in os.environ.get("V2PE_DEVICE_SIM_ALLOW", "").split()}
    allowed = _with_requirements(allowed)   # the project's own requirements are not the image's
    allowed.add("v2pe-megatron")
    hidden = _hidden_modules(allowed)

    class HidingPathFinder:
        @staticmethod
        def find_spec(fullname, path=None, target=None):
            top, _, rest = fullname.partition(".")
            if top in hidden or f"{top}.{rest.partition('.')[0]}" in hidden:
                return None
            return PathFinder.find_spec(fullname, path, target)

        @staticmethod
        def find_distributions(*args, **kwargs):  # importlib.metadata: hidden ones have no metadata there
            for d in PathFinder.find_distributions(*args, **kwargs):
                if _norm(d.metadata["Name"] or "") in allowed or d.metadata["Name"] is None:
                    yield d

        @staticmethod
        def invalidate_caches():
            PathFinder.invalidate_caches()

    sys.meta_path[:] = [HidingPathFinder if f is PathFinder else f for f in sys.meta_path]
    if os.environ.get("V2PE_DEVICE_SIM_VERBOSE"):
        print(f"device-sim: hiding {len(hidden)} modules: {' '.join(sorted(hidden))}", file=sys.stderr)


_install()
