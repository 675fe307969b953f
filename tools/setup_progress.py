"""Run a pip command for `make setup` and say what it is doing, in a few lines.

`pip install -q` of the project's stack (torch, its CUDA libraries, megatron-core, DALI, MLflow) is
silent for minutes; without `-q`, pip prints hundreds of lines. This keeps pip's full output in a log
file and prints one line per phase (resolving, each large download, installing, done), a line every
`--every` seconds while a phase lasts, and pip's own errors and warnings as they come. If pip fails,
the end of its output and the log's path follow.

    python tools/setup_progress.py --log .venv/setup.log "installing the project" -- python -m pip install ...

Standard library only: it runs with the fresh venv's Python before anything is installed.
"""

from __future__ import annotations

import argparse
import queue
import re
import subprocess
import sys
import threading
import time
from typing import Callable, Iterable, Iterator, Optional

PREFIX = "[setup]"
BIG_MB = 50.0  # downloads at least this large get their own line: they are where the minutes go

_COLLECT = re.compile(r"^Collecting (\S+)")
_DOWNLOAD = re.compile(r"^\s*Downloading (\S+) \((\d+(?:\.\d+)?) (kB|MB|GB)\)")
_INSTALLING = re.compile(r"^Installing collected packages: (.*)")
_INSTALLED = re.compile(r"^Successfully installed (.*)")
_BUILDING = re.compile(r"^\s*Building (?:wheel|editable) for (\S+)")
_PASS = re.compile(r"^(ERROR|WARNING|error|warning)\b|^\s*×")


def _mb(size: str, unit: str) -> float:
    return float(size) * {"kB": 1e-3, "MB": 1.0, "GB": 1e3}[unit]


def _elapsed(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Condenser:
    """pip's output lines in, the few lines a person wants out (``feed`` and ``tick`` return them)."""

    def __init__(self, what: str, *, every: float = 20.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.what, self.every, self.clock = what, every, clock
        self.start = self.last = clock()
        self.phase = "starting pip"
        self.collected: list[str] = []

    def _say(self, text: str) -> list[str]:
        self.last = self.clock()
        return [f"{PREFIX}   {text}"]

    def feed(self, line: str) -> list[str]:
        line = line.rstrip("\n")
        if _PASS.search(line):
            return self._say(line.strip())
        if line.startswith("Requirement already satisfied"):
            self.phase = "checking what is installed"
            return []
        if line.startswith("Obtaining "):
            self.phase = "preparing the project's metadata"
            return []
        if m := _COLLECT.match(line):
            self.collected.append(m.group(1))
            if self.phase != "resolving":
                self.phase = "resolving"
                return self._say("resolving the dependencies ...")
            return []
        if m := _DOWNLOAD.match(line):
            mb = _mb(m.group(2), m.group(3))
            if mb >= BIG_MB:
                self.phase = f"downloading {m.group(1)}"
                return self._say(f"downloading {m.group(1)} ({m.group(2)} {m.group(3)})")
            return []
        if m := _BUILDING.match(line):
            if self.phase == f"building {m.group(1)}":  # its "finished" line
                return []
            self.phase = f"building {m.group(1)}"
            return self._say(f"building {m.group(1)}")
        if m := _INSTALLING.match(line):
            n = len([p for p in m.group(1).split(",") if p.strip()])
            self.phase = f"installing {n} packages"
            return self._say(f"installing {n} packages ...")
        if m := _INSTALLED.match(line):
            self.phase = "done"
            return self._say(f"installed {len(m.group(1).split())} packages")
        return []

    def tick(self) -> list[str]:
        """A line when nothing was said for ``every`` seconds (pip is working, not hung)."""
        now = self.clock()
        if now - self.last < self.every:
            return []
        n = len(self.collected)
        extra = f"; {n} package{'s' * (n != 1)} so far, last: {self.collected[-1]}" \
            if self.phase == "resolving" and self.collected else ""
        return self._say(f"still {self.phase} ({_elapsed(now - self.start)}{extra})")

    def finish(self, returncode: int) -> list[str]:
        took = _elapsed(self.clock() - self.start)
        if returncode == 0:
            return [f"{PREFIX} {self.what}: done in {took}"]
        return [f"{PREFIX} {self.what}: pip failed (exit code {returncode}) after {took}"]


def _lines(stream) -> Iterator[Optional[str]]:
    """The stream's lines, with None every second while none comes (so that ``tick`` runs)."""
    q: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            q.put(line)
        q.put(StopIteration)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        try:
            item = q.get(timeout=1.0)
        except queue.Empty:
            yield None
            continue
        if item is StopIteration:
            return
        yield item


def run(cmd: list[str], what: str, log_path: str, *, every: float = 20.0, tail: int = 40,
        out=None) -> int:
    out = out or sys.stdout

    def emit(lines: Iterable[str]) -> None:
        for line in lines:
            print(line, file=out, flush=True)

    emit([f"{PREFIX} {what} (pip's full output: {log_path})"])
    c = Condenser(what, every=every)
    kept: list[str] = []
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in _lines(proc.stdout):
            if line is None:
                emit(c.tick())
                continue
            log.write(line)
            kept = (kept + [line.rstrip("\n")])[-tail:]
            emit(c.feed(line))
            emit(c.tick())
        code = proc.wait()
    emit(c.finish(code))
    if code != 0:
        emit([f"{PREFIX} the last {len(kept)} lines of pip's output:"] + [f"    {k}" for k in kept]
             + [f"{PREFIX} all of it: {log_path}"])
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: setup_progress.py [--log FILE] [--every S] WHAT -- COMMAND ...", file=sys.stderr)
        return 2
    k = argv.index("--")
    ap = argparse.ArgumentParser(prog="setup_progress.py")
    ap.add_argument("what", help="what the command does, for the progress lines")
    ap.add_argument("--log", default="setup.log", help="file that gets the command's full output (appended)")
    ap.add_argument("--every", type=float, default=20.0, help="seconds between 'still ...' lines")
    args = ap.parse_args(argv[:k])
    if not argv[k + 1:]:
        ap.error("no command after --")
    return run(argv[k + 1:], args.what, args.log, every=args.every)


if __name__ == "__main__":
    sys.exit(main())
