"""Every code block of README.md works as written: it runs here, or it is checked as far as a CPU
machine without a cluster allows, and the blocks that cannot run say why (issue 22, item 17).

The README's conventions (also in docs/readme.md):

- A fence names its language: ```` ```bash ```` (commands to type), ```` ```python ```` (code to
  run), ```` ```text ```` (shown output, file listings: not run). A fence without one fails here.
- A bash command is one line (or lines joined by a trailing ``\\``); ``# ...`` is a comment. No
  pipes, ``&&``, ``;`` or redirections (each command must be checkable on its own), and no
  ``[optional]`` / ``a|b`` notation: write the command as it is typed.
- Comment lines ``# -> LINE`` (continued by ``#    LINE``) right after a command show its output; a
  trailing `` \\`` continues the shown line, ``...`` elides. When the command runs here, its output
  must contain those lines, in order.
- Names the reader supplies (their recipe, a downloaded checkpoint) are listed in PLACEHOLDERS below;
  any other file a command reads must exist in the repository, or be written by an earlier command
  of the same block.

Every bash command is checked (quick): its program exists (a ``v2pe-*`` entry point of
pyproject.toml, a file, an installed tool); its arguments parse with the real CLI's own argparse
parser (the parser ``main`` builds, stopped right after it parsed); the files it names exist; a
recipe it names loads with its overrides (``v2pe-train`` through ``--print-recipe``: validated at
the world size it would start); ``make`` targets dry-run (``make -n``); sbatch scripts pass
``bash -n`` and their arguments parse with the CLI the script runs. Then each command either runs
(RUN_QUICK / RUN_SLOW, or automatically when it only prints: ``v2pe-plan``, ``--help``,
``--print-recipe``, ``--print-sbatch``) or is listed in NOT_RUN with the reason. A command in none
of them fails the test: a new README command needs a decision here. Python blocks are executed in
this process (with the PLACEHOLDERS' stand-ins).
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LANGS = ("bash", "python", "text")

# Names in README commands and code that stand for the reader's own files: what each is, and the
# repository file a check uses in its place (None: only the name is accepted, nothing is read).
PLACEHOLDERS: dict[str, tuple[str, str | None]] = {
    "my_recipe.yaml": ("the reader's own recipe", "recipes/tiny_cpu.yaml"),
    "ckpt/run": ("a checkpoint folder of the reader's training run", None),
    "runs/ckpt": ("a checkpoint folder of the reader's training run", None),
    "mm-niah/retrieval-text_val.jsonl": ("MM-NIAH's validation file, downloaded by the reader", None),
    "MM-NIAH/mm_niah_val": ("MM-NIAH's validation split folder as shipped (annotations/ + images/), downloaded by the reader", None),
    "InternVL2-2B": ("a downloaded HuggingFace InternVL2-2B folder", None),
    "DIR": ("an HF checkpoint folder", None),
    "path/to/InternVL2-2B": ("a downloaded HuggingFace InternVL2 folder (python block: a tiny random one is "
                             "written in its place)", None),
}

# Commands run for real, in this process (the CLI's ``main``, or the script), in a scratch folder
# that links the repository's folders (outputs land there). Quick: < 1 s each.
RUN_QUICK: dict[str, str] = {
    "v2pe-train --list": "prints the shipped recipes and presets (~1 s, no torch import)",
}
# Slow-marked: real work of a few seconds each (< 30 s in all).
RUN_SLOW: dict[str, str] = {
    "v2pe-data synth data/niah --num-samples 200 --recipe recipes/tiny_cpu.yaml":
        "writes the set (~2 s), then inspected by the next command",
    "v2pe-data inspect recipes/tiny_cpu.yaml --meta data/niah/meta.json --show 3":
        "one epoch of the loader over the 200 samples; every sample fits (its `# ->` lines)",
    "v2pe-data inspect recipes/tiny_cpu.yaml --meta data/niah/meta.json --skips-file skips.jsonl":
        "the same epoch, every skip written to a file (none here)",
    "v2pe-data synth data/needles --needles --lengths 1024 4096 --depths 0 0.5 1":
        "36 needle samples in MM-NIAH format",
    ".venv/bin/python tools/plot_positions.py --out positions.png --deltas 1 1/4 1/16 1/256":
        "one matplotlib figure",
}
# Commands that cannot run here (they are still checked as above): why not, and what covers them.
NOT_RUN: dict[str, str] = {
    "make demo": "creates .venv and installs the stack (minutes, network), then trains; the training is "
                 "`v2pe-train recipes/tiny_cpu.yaml` (tests/cli/test_golden_loss.py runs it)",
    "make test": "the whole suite (~30 min)",
    "make setup": "creates .venv and installs the stack (minutes, network); its output: "
                  "tests/tools/test_setup_progress.py",
    "make test PYTEST_ARGS=-m 'not slow'": "the quick loop (~1 min), which contains this test",
    "make test PYTEST_ARGS=tests/parallel -q": "a package's tests (minutes)",
    ".venv/bin/pip install --no-build-isolation -c constraints.txt -e .[gpu]":
        "builds Transformer Engine: needs CUDA and the network",
    "v2pe-train recipes/tiny_cpu.yaml": "a 30-step 2-rank training (~40 s here); tests/cli/test_golden_loss.py",
    "v2pe-train recipes/tiny_cpu.yaml train.steps=100 optimizer.lr=3e-4": "a 100-step training",
    "v2pe-train recipes/tiny_cpu.yaml --nproc 4 parallel.tp=2 parallel.pp=2":
        "a 4-rank training; tests/cli/test_golden_loss.py runs these layouts",
    "v2pe-train recipes/tiny_cpu.yaml checkpoint.dir=ckpt/tiny checkpoint.save_interval=10":
        "a training with checkpoints; tests/cli/test_train_resilience.py",
    "torchrun --nproc-per-node 8 -m v2pe_megatron.cli.train my_recipe.yaml": "8 ranks of the reader's recipe",
    ".venv/bin/python benchmarks/loader.py": "a benchmark (minutes); results in benchmarks/RESULTS.md",
    "make effect": "the ~40-minute V2PE effect experiment (docs/v2pe.md); its miniature runs in "
                   "tests/test_benchmark_v2pe_effect.py::test_miniature_experiment_runs_end_to_end",
    ".venv/bin/python benchmarks/v2pe_positions.py": "a benchmark: it pins its process to one core and fails "
                                                      "over a time budget (a timing, not a test); the positions "
                                                      "themselves: tests/test_v2pe_positions.py",
    "v2pe-eval recipes/tiny_cpu.yaml --lengths 128 256 --depths 0 0.5 1 --delta 1 1/16 auto":
        "generation over 24 samples at 3 deltas: ~5 min of CPU here; tests/cli/test_eval_cli.py runs a smaller one",
    "v2pe-eval my_recipe.yaml --ckpt ckpt/run --data mm-niah/retrieval-text_val.jsonl --delta 1 1/16 1/64 auto "
    "--mode teacher-forced parallel.cp=8": "the reader's checkpoint and MM-NIAH's files, 8 ranks",
    "v2pe-eval my_recipe.yaml --ckpt ckpt/run --data MM-NIAH/mm_niah_val --delta auto --mode generate parallel.cp=8":
        "needs MM-NIAH's data and a trained model; tests/eval/test_aggregations.py scores MM-NIAH-shaped files",
    "srun python -m v2pe_megatron.cli.eval my_recipe.yaml --ckpt ckpt/run --delta auto": "inside a Slurm allocation",
    "v2pe-convert import-hf --hf InternVL2-2B --out ckpt/internvl2-2b --verify":
        "a downloaded InternVL2-2B; tests/convert/ import tiny ones",
    "v2pe-convert import-hf --hf DIR --out CKPT --img-context-token-id 92546": "the reader's HF folder",
    "v2pe-train my_recipe.yaml checkpoint.pretrained=ckpt/internvl2-2b": "trains from the imported 2B checkpoint",
    "v2pe-convert export-hf --ckpt runs/ckpt --out out-hf --layout remote-code --model-yaml my_recipe.yaml "
    "--tokenizer InternVL2-2B --verify": "the reader's checkpoint; tests/convert/test_import_export.py",
    ".venv/bin/python benchmarks/cp_memory.py": "a benchmark (minutes); results in benchmarks/RESULTS.md",
    ".venv/bin/python benchmarks/checkpoint.py": "a benchmark (minutes); results in benchmarks/RESULTS.md",
    ".venv/bin/mlflow ui --backend-store-uri sqlite:///runs/tiny_cpu/mlflow.db": "a web server that runs until stopped",
    "sbatch --ntasks=2 slurm/train.sbatch recipes/tiny_cpu.yaml": "needs a Slurm cluster; tests/slurm/ runs this "
                                                                  "script on a real single-node Slurm",
}

# Commands that only print: run (quick) without being listed.
PRINT_ONLY_FLAGS = ("--help", "-h", "--print-recipe", "--print-sbatch")
PRINT_ONLY_PROGRAMS = ("v2pe-plan",)

# argparse destinations that name files a command reads, and ones it writes.
INPUT_DESTS = {"recipe", "meta", "ckpt", "data", "hf", "tokenizer", "model_yaml", "image_root", "input_ids"}
OUTPUT_DESTS = {"out", "out_dir", "write_recipe", "results"}


# --------------------------------------------------------------------------------------------- parsing
@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    body: str


@dataclass
class Command:
    line: int
    argv: list[str]
    env: dict[str, str]
    expected: list[str] = field(default_factory=list)  # its `# ->` lines

    @property
    def key(self) -> str:
        return " ".join([f"{k}={v}" for k, v in self.env.items()] + self.argv)

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.key}"


def parse_blocks(text: str) -> list[Block]:
    blocks, open_at, lang, body = [], None, "", []
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*```(.*)$", line)
        if m and open_at is None:
            open_at, lang, body = n, m.group(1).strip(), []
        elif m:
            blocks.append(Block(open_at, lang, "\n".join(body)))
            open_at = None
        elif open_at is not None:
            body.append(line)
    assert open_at is None, f"README.md:{open_at}: the fence is never closed"
    return blocks


def split_command(text: str) -> list[str]:
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def bash_commands(block: Block) -> list[Command]:
    lines = block.body.splitlines()
    cmds: list[Command] = []
    i = 0
    while i < len(lines):
        n, s = block.line + 1 + i, lines[i].strip()
        if s.startswith("# ->") and cmds:
            shown = [s[4:].strip()]
            while i + 1 < len(lines) and re.match(r"^\s*#\s{3,}\S", lines[i + 1]):
                i += 1
                shown.append(lines[i].strip()[1:].strip())
            cmds[-1].expected = _join_continued(shown)
            i += 1
            continue
        if not s or s.startswith("#"):
            i += 1
            continue
        text = lines[i]
        while text.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text.rstrip()[:-1] + " " + lines[i]
        i += 1
        tokens = split_command(text)
        ops = [t for t in tokens if t and all(c in "();<>|&" for c in t)]
        assert not ops, (f"README.md:{n}: shell operator {ops[0]!r} in {text.strip()!r}: one command per line, "
                         f"as typed (no `a|b` alternatives or pipes)")
        bad = [t for t in tokens if t.startswith("[") or t.endswith("]") and "[" not in t]
        assert not bad, f"README.md:{n}: {bad[0]!r}: write optional parts as a second command, not [...]"
        env = {}
        while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
            k, v = tokens.pop(0).split("=", 1)
            env[k] = v
        cmds.append(Command(n, tokens, env))
    return cmds


def _join_continued(lines: list[str]) -> list[str]:
    out: list[str] = []
    cont = False
    for line in lines:
        if cont:
            out[-1] = out[-1] + " " + line
        else:
            out.append(line)
        cont = out[-1].endswith("\\")
        if cont:
            out[-1] = out[-1][:-1].rstrip()
    return out


def readme_blocks() -> list[Block]:
    return parse_blocks(README.read_text())


def readme_commands() -> list[tuple[Block, Command]]:
    return [(b, c) for b in readme_blocks() if b.lang == "bash" for c in bash_commands(b)]


def how_checked(cmd: Command) -> tuple[str, str]:
    """("quick" | "slow" | "not-run", why)."""
    if cmd.key in RUN_QUICK:
        return "quick", RUN_QUICK[cmd.key]
    if cmd.key in RUN_SLOW:
        return "slow", RUN_SLOW[cmd.key]
    if cmd.key in NOT_RUN:
        return "not-run", NOT_RUN[cmd.key]
    if cmd.argv and (cmd.argv[0] in PRINT_ONLY_PROGRAMS or any(a in PRINT_ONLY_FLAGS for a in cmd.argv)):
        return "quick", "only prints"
    raise AssertionError(f"{cmd}: a README command that tests/test_readme.py does not know: run it "
                         f"(RUN_QUICK, RUN_SLOW) or say why it cannot run here (NOT_RUN)")


# --------------------------------------------------------------------------------------------- checking
def entry_points() -> dict[str, str]:
    """``v2pe-*`` -> module, from pyproject.toml's [project.scripts]."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: target.split(":")[0] for name, target in scripts.items()}


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


@contextlib.contextmanager
def _stop_after_parsing():
    """The real CLI's ``main`` builds its parser and parses; this stops it right there."""
    originals = {n: getattr(argparse.ArgumentParser, n) for n in ("parse_args", "parse_intermixed_args")}

    def stopper(name):
        def parse(self, args=None, namespace=None):
            raise _Parsed(originals[name](self, args, namespace))
        return parse

    for n in originals:
        setattr(argparse.ArgumentParser, n, stopper(n))
    try:
        yield
    finally:
        for n, f in originals.items():
            setattr(argparse.ArgumentParser, n, f)


def parse_only(call, what: str) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with _stop_after_parsing(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            call()
    except _Parsed as p:
        return p.namespace
    except SystemExit as e:
        raise AssertionError(f"{what}: the arguments do not parse (exit {e.code}): {err.getvalue().strip()}") from None
    raise AssertionError(f"{what}: the program returned without parsing arguments with argparse")


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []


def _placeholder(value: str) -> str | None:
    return value if value in PLACEHOLDERS else None


class Checker:
    """Checks one block's commands in order; remembers what earlier ones write."""

    def __init__(self, where: Block) -> None:
        self.block = where
        self.outputs: list[str] = []
        self.used_placeholders: set[str] = set()

    # -- files
    def _input(self, cmd: Command, value: str, what: str) -> None:
        if _placeholder(value):
            self.used_placeholders.add(value)
            return
        if self._named_elsewhere(value):
            return
        assert (REPO / value).exists(), (f"{cmd}: {what} {value!r} does not exist in the repository (a file the "
                                         f"reader supplies goes into PLACEHOLDERS)")

    def _paths(self, cmd: Command, ns: argparse.Namespace) -> None:
        for dest, value in vars(ns).items():
            for v in _strings(value):
                if dest in OUTPUT_DESTS:
                    self.outputs.append(v)
                elif dest in INPUT_DESTS:
                    self._input(cmd, v, f"--{dest.replace('_', '-')}")
                elif "/" in v and "=" not in v and "://" not in v:
                    self._input(cmd, v, dest)

    def _named_elsewhere(self, value: str) -> bool:
        return bool(_placeholder(value)) or any(value == o or value.startswith(o.rstrip("/") + "/")
                                                for o in self.outputs)

    def _stand_in(self, value: str) -> str:
        return (PLACEHOLDERS[value][1] or value) if value in PLACEHOLDERS else value

    # -- programs
    def check(self, cmd: Command) -> None:
        prog, args = cmd.argv[0], cmd.argv[1:]
        if prog in entry_points():
            self.cli(cmd, entry_points()[prog], args)
        elif prog in (".venv/bin/python", "python", "python3"):
            self.python(cmd, args)
        elif prog == "make":
            self.make(cmd, args)
        elif prog == "torchrun":
            from torch.distributed.run import get_args_parser

            ns = parse_only(lambda: get_args_parser().parse_args(args), str(cmd))
            assert ns.module, f"{cmd}: torchrun -m MODULE is how the README starts ranks"
            self.python(cmd, ["-m", ns.training_script, *ns.training_script_args])
        elif prog == "srun":
            rest = list(args)
            while rest and rest[0].startswith("-"):
                opt = rest.pop(0)
                if "=" not in opt and rest and re.fullmatch(r"\d+", rest[0]):
                    rest.pop(0)
            self.check(Command(cmd.line, rest, cmd.env))
        elif prog == "sbatch":
            self.sbatch(cmd, args)
        elif prog == ".venv/bin/pip":
            self.pip(cmd, args)
        elif prog.startswith(".venv/bin/"):
            name = prog.rsplit("/", 1)[1]
            scripts = {ep.name for ep in importlib.metadata.entry_points(group="console_scripts")}
            assert name in scripts, f"{cmd}: no installed package provides the command {name!r}"
        else:
            raise AssertionError(f"{cmd}: tests/test_readme.py does not know how to check the program {prog!r}")

    def cli(self, cmd: Command, module: str, args: list[str]) -> None:
        main = importlib.import_module(module).main
        ns = parse_only(lambda: main(list(args)), str(cmd))
        self._paths(cmd, ns)
        self.recipe(cmd, module, ns, args)

    def recipe(self, cmd: Command, module: str, ns: argparse.Namespace, args: list[str]) -> None:
        """The recipe a command names loads with its overrides (v2pe-train: and validates for the ranks
        it would start, through its own --print-recipe)."""
        from v2pe_megatron.config import load_recipe

        items: list[str] = []
        if isinstance(getattr(ns, "recipe", None), str):
            items = [ns.recipe, *getattr(ns, "overrides", [])]
        elif getattr(ns, "recipe_args", None):  # v2pe-data inspect RECIPE key=value ...
            items = list(ns.recipe_args)
        elif isinstance(getattr(ns, "recipe", None), list):  # v2pe-data synth --recipe RECIPE key=value ...
            items = list(ns.recipe)
        if not items:
            return
        path = next((i for i in items if "=" not in i), None)
        overrides = []
        for o in (i for i in items if "=" in i):
            key, value = o.split("=", 1)
            if self._named_elsewhere(value):  # a file the reader supplies or an earlier command writes
                _assert_recipe_key(cmd, key)
                args = [a for a in args if a != o]
            else:
                overrides.append(o)
        if path is not None:
            self._input(cmd, path, "recipe")
            path = self._stand_in(path)
        meta = getattr(ns, "meta", None)
        if meta and not any(meta.startswith(o) for o in self.outputs):
            overrides.append(f"data.meta_path={meta}")
        if module == "v2pe_megatron.cli.train":
            main = importlib.import_module(module).main
            real = [self._stand_in(a) for a in args]
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([*real, "--print-recipe"]) if "--print-sbatch" not in real else 0
            assert code == 0, f"{cmd}: the recipe does not load and validate: {err.getvalue().strip()}"
            return
        try:
            load_recipe(path, overrides)
        except Exception as e:  # noqa: BLE001 - the message is the point
            raise AssertionError(f"{cmd}: the recipe does not load: {e}") from None

    def python(self, cmd: Command, args: list[str]) -> None:
        if args[:1] == ["-m"]:
            module = args[1]
            assert importlib.util.find_spec(module) is not None, f"{cmd}: no module {module}"
            if module in entry_points().values():
                self.cli(cmd, module, args[2:])
            return
        script = REPO / args[0]
        assert script.is_file(), f"{cmd}: no script {args[0]}"
        ns = parse_only(lambda: _run_script(script, args[1:]), str(cmd))
        self._paths(cmd, ns)

    def make(self, cmd: Command, args: list[str]) -> None:
        dry = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=30,
                             env={**os.environ, **cmd.env})
        assert dry.returncode == 0, f"{cmd}: make -n fails: {dry.stderr.strip()}"
        for a in args:
            if a.startswith("PYTEST_ARGS="):
                words = shlex.split(a.split("=", 1)[1])
                markers = {m.split(":")[0] for m in
                           tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]}
                for k, w in enumerate(words):
                    if k and words[k - 1] == "-m":
                        names = set(re.findall(r"\w+", w)) - {"and", "or", "not"}
                        assert names <= markers, f"{cmd}: unknown pytest marker(s) {names - markers}"
                    elif not w.startswith("-"):
                        assert (REPO / w.split("::")[0]).exists(), f"{cmd}: no test path {w}"

    def sbatch(self, cmd: Command, args: list[str]) -> None:
        rest = list(args)
        while rest and rest[0].startswith("-"):
            rest.pop(0)
        assert rest, f"{cmd}: no batch script"
        script = REPO / rest[0]
        assert script.is_file(), f"{cmd}: no batch script {rest[0]}"
        syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert syntax.returncode == 0, f"{cmd}: {rest[0]}: {syntax.stderr.strip()}"
        m = re.search(r"v2pe_srun (v2pe_megatron\.cli\.\w+)", script.read_text())
        assert m, f"{cmd}: {rest[0]} runs no v2pe_megatron CLI that this test knows"
        self.cli(cmd, m.group(1), rest[1:])

    def pip(self, cmd: Command, args: list[str]) -> None:
        assert args[:1] == ["install"], f"{cmd}: only `pip install` is documented"
        extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for k, a in enumerate(args):
            prev = args[k - 1] if k else ""
            if prev in ("-c", "--constraint", "-r", "--requirement"):
                assert (REPO / a).is_file(), f"{cmd}: no file {a}"
            if prev in ("-e", "--editable"):
                m = re.fullmatch(r"([^\[]+)(?:\[([\w,-]+)\])?", a)
                assert m and (REPO / m.group(1) / "pyproject.toml").is_file(), f"{cmd}: {a} is not this project"
                missing = set((m.group(2) or "").split(",")) - {""} - set(extras)
                assert not missing, f"{cmd}: pyproject.toml has no extra {missing}"


def _assert_recipe_key(cmd: Command, key: str) -> None:
    from omegaconf import OmegaConf

    from v2pe_megatron.config import Recipe

    missing = object()
    assert OmegaConf.select(OmegaConf.structured(Recipe), key, default=missing) is not missing, \
        f"{cmd}: {key} is not a recipe key"


def _run_script(script: Path, args: list[str]):
    """``python script args`` in this process (sys.argv and sys.path as Python sets them)."""
    argv, path = sys.argv[:], sys.path[:]
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = argv, path
        if cpus is not None:  # a benchmark may pin itself; this process goes on with its tests
            os.sched_setaffinity(0, cpus)


# --------------------------------------------------------------------------------------------- running
COPIED = ("recipes", "slurm")  # small, and commands print paths into them relative to the working folder


def _link_repo(scratch: Path) -> None:
    import shutil

    for item in REPO.iterdir():
        if item.is_dir() and not item.name.startswith(".") and item.name not in ("runs", "data"):
            if item.name in COPIED:
                shutil.copytree(item, scratch / item.name)
            else:
                (scratch / item.name).symlink_to(item)


def run_command(cmd: Command, scratch: Path, capsys) -> str:
    """Runs a command in this process, in ``scratch``; returns its stdout. Fails on a non-zero exit."""
    prog, args = cmd.argv[0], cmd.argv[1:]
    code: object = 0
    with contextlib.chdir(scratch):
        try:
            if prog in entry_points():
                code = importlib.import_module(entry_points()[prog]).main(list(args))
            elif prog in (".venv/bin/python", "python", "python3") and args[0] != "-m":
                _run_script(scratch / args[0], args[1:])
            else:
                raise AssertionError(f"{cmd}: tests/test_readme.py cannot run this program in-process")
        except SystemExit as e:
            code = e.code
    out, err = capsys.readouterr()
    assert code in (0, None), f"{cmd}: exit code {code}\n{err[-3000:]}"
    # the README's commands run from the repository's root: paths into it print relative to it there
    return out.replace(f"{REPO}/", "")


def check_shown_output(cmd: Command, out: str) -> None:
    """The command's ``# ->`` lines appear in its output, in order (``...`` elides)."""
    lines = [" ".join(x.split()) for x in out.splitlines() if x.strip()]
    at = 0
    for shown in cmd.expected:
        if shown.strip() == "...":
            continue
        pat = re.compile(".*".join(re.escape(" ".join(p.split())) for p in shown.split("...")))
        k = next((k for k in range(at, len(lines)) if pat.fullmatch(lines[k])), None)
        assert k is not None, f"{cmd}: the README shows the output line {shown!r}; it printed:\n{out[-3000:]}"
        at = k + 1


def _python_free_names(src: str) -> set[str]:
    tree = ast.parse(src)
    stored = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    stored |= {a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
               for a in n.names}
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return loaded - stored - set(dir(builtins))


def _hf_stand_in(tmp: Path) -> dict:
    """A tiny random remote-code InternVL folder for "path/to/InternVL2-2B", and inputs for it."""
    import torch

    from v2pe_megatron.testing.hf_fixtures import remote_checkpoint, tiny_model_config

    mc = tiny_model_config()
    remote_checkpoint(str(tmp / "InternVL2-tiny"), mc)
    n, s = mc.num_image_token, mc.vision.image_size
    special = {mc.img_start_token_id, mc.img_end_token_id, mc.img_context_token_id}
    text = [t for t in range(20, 40) if t not in special][:4]
    ids = [*text[:2], mc.img_start_token_id, *[mc.img_context_token_id] * n, mc.img_end_token_id, *text[2:]]
    input_ids = torch.tensor([ids])
    pos = [0.0, 1.0, 2.0, *[2.0 + (k + 1) / 16 for k in range(n)]]
    pos += [float(int(pos[-1]) + 1 + k) for k in range(3)]  # V2PE: </img> rounds up, then text by 1
    return {"path": str(tmp / "InternVL2-tiny"), "input_ids": input_ids,
            "pixel_values": torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0)),
            "position_ids": torch.tensor([pos], dtype=torch.float64)}


# Names a python block uses without defining them: what the reader passes, and the stand-in.
PROVIDED = {"input_ids": "token ids [B, S] with <IMG_CONTEXT> runs", "pixel_values": "tiles [T, 3, H, W]",
            "position_ids": "V2PE positions [B, S] (float)"}


def run_python_block(block: Block, tmp: Path) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    src, ns = block.body, {"__name__": "__readme__"}
    free = _python_free_names(src)
    unknown = free - set(PROVIDED)
    assert not unknown, f"README.md:{block.line}: python block uses {sorted(unknown)} without defining them"
    if free or "path/to/" in src:
        stand_in = _hf_stand_in(tmp)
        ns.update({k: stand_in[k] for k in free})
        for name in PLACEHOLDERS:
            if f'"{name}"' in src:
                src = src.replace(f'"{name}"', repr(stand_in["path"]))
    assert not dist.is_initialized() and not ps.model_parallel_is_initialized(), \
        "an earlier test left a process group or megatron state behind: the block would not run as in a script"
    try:
        with contextlib.chdir(REPO):
            exec(compile(src, f"README.md:{block.line}", "exec"), ns)
    finally:
        for v in list(ns.values()):
            release = getattr(v, "release_process_group", None)
            if callable(release):
                release()
    return ns


# --------------------------------------------------------------------------------------------- tests
def test_every_fence_names_its_language():
    blocks = readme_blocks()
    assert len(blocks) >= 10
    bad = [f"README.md:{b.line}: ```{b.lang}" for b in blocks if b.lang not in LANGS]
    assert not bad, f"fences must say bash, python or text (output): {bad}"


def test_every_command_is_run_or_says_why_not():
    cmds = readme_commands()
    for _, c in cmds:
        how_checked(c)
    keys = {c.key for _, c in cmds}
    stale = [k for k in (*RUN_QUICK, *RUN_SLOW, *NOT_RUN) if k not in keys]
    assert not stale, f"listed in tests/test_readme.py but no longer in README.md: {stale}"
    used = {p for p in PLACEHOLDERS if any(p in b.body for b in readme_blocks())}
    assert used == set(PLACEHOLDERS), f"PLACEHOLDERS no README block uses: {set(PLACEHOLDERS) - used}"


@pytest.fixture
def quiet_logging():
    import logging

    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


BASH_BLOCKS = [b for b in readme_blocks() if b.lang == "bash"]


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=[f"README.md:{b.line}" for b in BASH_BLOCKS])
def test_every_command_parses_and_names_what_exists(block, quiet_logging):
    """Each command's program, arguments, files and recipe (quick: nothing is run), block by block."""
    problems = []
    checker = Checker(block)
    for cmd in bash_commands(block):
        try:
            checker.check(cmd)
        except AssertionError as e:
            problems.append(str(e))
    assert not problems, "\n".join(problems)


def _runs(tier: str) -> list[Block]:
    return [b for b in readme_blocks() if b.lang == "bash"
            and any(how_checked(c)[0] == tier for c in bash_commands(b))]


def _run_tier(tier: str, tmp_path, capsys) -> None:
    for k, block in enumerate(_runs(tier)):
        scratch = tmp_path / f"block{k}"
        scratch.mkdir()
        _link_repo(scratch)
        for cmd in bash_commands(block):
            if how_checked(cmd)[0] == tier:
                check_shown_output(cmd, run_command(cmd, scratch, capsys))


def test_quick_commands_run(tmp_path, capsys, quiet_logging):
    _run_tier("quick", tmp_path, capsys)


@pytest.mark.slow
def test_slow_commands_run(tmp_path, capsys, quiet_logging):
    _run_tier("slow", tmp_path, capsys)


def test_python_blocks_run(tmp_path):
    blocks = [b for b in readme_blocks() if b.lang == "python"]
    assert blocks
    for k, block in enumerate(blocks):
        run_python_block(block, tmp_path / f"py{k}")


# ----- the README examples that used to fail as written (issue 22, item 17)
def test_model_api_snippet_builds_a_model_in_a_plain_process(tmp_path):
    block = next(b for b in readme_blocks() if b.lang == "python" and "build_model(" in b.body)
    ns = run_python_block(block, tmp_path)
    assert ns["model"].pre_process and ns["model"].post_process
    assert not any(p.requires_grad for p in ns["model"].projector.parameters())


def test_hf_snippet_gives_float32_logits(tmp_path):
    block = next(b for b in readme_blocks() if b.lang == "python" and "hf.load(" in b.body)
    ns = run_python_block(block, tmp_path)
    b, s = ns["input_ids"].shape
    assert ns["logits"].dtype.is_floating_point and str(ns["logits"].dtype) == "torch.float32"
    assert ns["logits"].shape[:2] == (b, s)


def test_the_parser_sees_what_bash_sees():
    b = Block(1, "bash", "A=1 v2pe-x 'a b' c \\\n  --d=1@2  # note\n# -> out \\\n#    more ... end\n#    two\n")
    (c,) = bash_commands(b)
    assert c.argv == ["v2pe-x", "a b", "c", "--d=1@2"] and c.env == {"A": "1"}
    assert c.expected == ["out more ... end", "two"]
    for bad in ("v2pe-x --layout a|b", "v2pe-x [--tp 2]", "a && b"):
        with pytest.raises(AssertionError):
            bash_commands(Block(1, "bash", bad))
    check_shown_output(c, "x\nout   more words end\ny\ntwo\n")
    with pytest.raises(AssertionError):
        check_shown_output(c, "two\nout more end\n")
