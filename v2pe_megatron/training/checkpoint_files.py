"""A checkpoint folder as files: its names, ``latest``, and whether an iteration matches its manifest
by names and sizes. Torch-free on purpose: ``v2pe-train`` asks these questions before it imports
torch or starts a rank (``v2pe_megatron.preflight``); ``training.checkpointing`` writes and loads the
checkpoints themselves and re-exports these names.

Layout on disk::

    <dir>/iter_0000010/                one megatron dist_checkpointing (torch_dist) checkpoint
    <dir>/iter_0000010/model.yaml      the recipe's model section and the sequence length it trained at
    <dir>/iter_0000010/manifest.json   relative path, size and sha256 of every other file in it
    <dir>/latest                       text file with the last *complete* iteration
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be used; the message names it and says why.

    ``collective``: raised with the same message on every rank (a collective decision such as
    ``checkpointing.find_resumable``'s), so one rank says it for all."""

    def __init__(self, message: str, *, collective: bool = False):
        super().__init__(message)
        self.collective = collective


def iteration_dir(ckpt_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(ckpt_dir) / f"iter_{iteration:07d}"


def latest_iteration(ckpt_dir: str | os.PathLike) -> Optional[int]:
    """What ``latest`` says (None without one); garbage in it or a missing folder is a CheckpointError."""
    f = Path(ckpt_dir) / "latest"
    if not f.is_file():
        return None
    text = f.read_text(errors="replace").strip()
    if not text.isdigit() or not iteration_dir(ckpt_dir, int(text)).is_dir():
        raise CheckpointError(f"{f} names iteration {text[:40]!r}, which has no checkpoint folder in {ckpt_dir}")
    return int(text)


def saved_iterations(ckpt_dir: str | os.PathLike) -> list[int]:
    """Iterations with a (renamed, so once complete) ``iter_*`` folder, ascending."""
    out = []
    for p in Path(ckpt_dir).glob("iter_*"):
        digits = p.name[len("iter_"):]
        if p.is_dir() and digits.isdigit():
            out.append(int(digits))
    return sorted(out)


def files_in(folder: Path) -> list[str]:
    """The checkpoint's files (relative paths), the manifest itself excluded."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def manifest_problem(folder: Path) -> tuple[Optional[str], dict]:
    """(why ``folder`` does not match its manifest by file names and sizes, or None; the manifest's
    file table). The cheap half of ``checkpointing.verify``, which then compares the sha256 sums."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except FileNotFoundError:
        return f"no {MANIFEST} (an incomplete save, or written before manifests existed)", {}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"unreadable {MANIFEST} ({e})", {}
    for name, meta in sorted(files.items()):
        p = folder / name
        if not p.is_file():
            return f"{name} is missing", files
        if p.stat().st_size != meta.get("size"):
            return f"{name} has {p.stat().st_size} bytes, the manifest says {meta.get('size')}", files
    # files it does not list (notes.txt, .DS_Store) are never read by a load: not damage
    return None, files


def finished_iteration(ckpt_dir: str | os.PathLike) -> Optional[int]:
    """The iteration ``latest`` names when its folder matches its manifest by names and sizes (no
    hashing: that is the resume's job), else None. What a run that resumes would start from unless
    a file's contents changed since it was saved."""
    try:
        it = latest_iteration(ckpt_dir)
    except (CheckpointError, OSError):
        return None
    if it is None or manifest_problem(iteration_dir(ckpt_dir, it))[0] is not None:
        return None
    return it


def weights_dir(path: str | os.PathLike) -> Path:
    """The torch_dist checkpoint that ``path`` names: itself (an ``iter_*`` folder or a weights-only
    folder), or, for a training checkpoint folder with a ``latest`` file, its latest iteration.
    Raises with the path and what is wrong before anything is read. Nothing is verified here (a
    recipe check, no collective): loads go through :func:`checkpoint_folder`."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if not p.is_dir():
        raise NotADirectoryError(f"{p} is a file, not a checkpoint folder")
    if (p / "latest").is_file() and not (p / "metadata.json").is_file():
        it = latest_iteration(p)
        assert it is not None
        p = iteration_dir(p, it)
    if not (p / "metadata.json").is_file():
        raise ValueError(f"{p} is not a torch_dist checkpoint (no metadata.json): give an iter_* folder, a "
                         f"checkpoint folder with 'latest', or a weights folder as save_model_weights writes")
    return p


def recorded_seq_length(path: str | os.PathLike) -> Optional[tuple[int, Path]]:
    """(``data.seq_length``, the file) that the checkpoint ``path`` names (as :func:`weights_dir`
    resolves it) records in its ``model.yaml``: the sequence length it was trained at, which
    ``v2pe-train`` writes there. None when there is no such record (a ``v2pe-convert import-hf``
    folder, a checkpoint of an older version, a path that is no checkpoint: its loader says why)."""
    import yaml

    try:
        f = weights_dir(path) / "model.yaml"
        doc = yaml.safe_load(f.read_text()) if f.is_file() else None
    except (OSError, ValueError, CheckpointError, yaml.YAMLError):
        return None
    n = (doc.get("data") or {}).get("seq_length") if isinstance(doc, dict) else None
    return (n, f) if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None
