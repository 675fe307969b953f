"""Where a tool may write: one rule, asked at start by every command that writes a folder at its end
(``v2pe-train``'s ``checkpoint.dir``, ``v2pe-eval --out``, ``v2pe-plan --write-recipe``,
``v2pe-convert --out``). Torch-free, so the checks stay instant."""

from __future__ import annotations

import os


def unwritable_dir(path: str | os.PathLike) -> str | None:
    """Why files cannot be written into the folder ``path`` (made when missing), or None when they can.

    Nothing is left behind: the nearest existing folder on the way is probed by creating a
    temporary file of a unique name (``os.access`` checks permissions only: it says yes to root in
    /proc, where nothing can be created), so every rank may ask at once. Asked at start, so that an
    output folder a tool writes at its end fails in one line before any work, not after it."""
    import tempfile
    from pathlib import Path

    probe = Path(path).absolute()
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.exists():
        return f"{probe} is a broken link"
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".v2pe-write-test-", dir=probe)
    except OSError as e:
        return f"cannot create files in {probe} ({e.strerror or e})"
    os.close(fd)
    os.unlink(name)
    return None
