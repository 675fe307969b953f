"""The package's shape: no import cycles between our modules, and data/ and model/ are siblings
(neither imports the other; what they share lives in parallel/ and v2pe.py)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "v2pe_megatron"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path, known: set[str], *, runtime_only: bool) -> set[str]:
    """Our modules imported by ``path``; runtime_only skips ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    if runtime_only:
        for n in ast.walk(tree):
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                skip.update(id(x) for x in ast.walk(n))
    found = set()
    for n in ast.walk(tree):
        if id(n) in skip:
            continue
        if isinstance(n, ast.ImportFrom) and n.module:
            found.add(n.module)
            found.update(f"{n.module}.{a.name}" for a in n.names)
        elif isinstance(n, ast.Import):
            found.update(a.name for a in n.names)
    return {m for m in found if m in known}


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(p, set(mods), runtime_only=True) - {m} for m, p in mods.items()}
    # a package importing its own submodules (parallel/__init__ -> parallel.layout) is not a cycle
    graph = {m: {d for d in ds if not d.startswith(m + ".")} for m, ds in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:  # d is on the current path
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_data_and_model_are_siblings():
    mods = _modules()
    for m, p in mods.items():
        deps = _imports(p, set(mods), runtime_only=False)
        if m.startswith("v2pe_megatron.data"):
            assert not [d for d in deps if d.startswith("v2pe_megatron.model")], (m, deps)
        if m.startswith("v2pe_megatron.model"):
            assert not [d for d in deps if d.startswith("v2pe_megatron.data")], (m, deps)
