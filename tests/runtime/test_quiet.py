"""``quiet_library_warnings`` drops exactly the library messages it lists (by message and category, or
logger and message) and nothing a user can act on."""

from __future__ import annotations

import logging
import warnings

import pytest

from v2pe_megatron.runtime.quiet import SILENCED, SILENCED_LOGS, quiet_library_warnings


@pytest.fixture
def quiet(monkeypatch):
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "INFO")  # restored afterwards
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_library_warnings()
        yield seen


@pytest.mark.parametrize("pattern, category", SILENCED)
def test_each_listed_warning_is_silenced_and_only_in_its_category(quiet, pattern, category):
    msg = pattern.replace("\\", "") + " (as the library words it)"
    warnings.warn(msg, category)
    assert not quiet
    other = DeprecationWarning if category is not DeprecationWarning else UserWarning
    warnings.warn(msg, other)
    assert len(quiet) == 1


def test_other_warnings_still_show(quiet):
    warnings.warn("data.overlong=truncate cut 3 samples", UserWarning)
    warnings.warn("Transformer Engine 2.9 does not support a2a with thd", UserWarning)
    assert len(quiet) == 2


@pytest.mark.parametrize("name, pattern", SILENCED_LOGS)
def test_each_listed_log_line_is_dropped_and_others_from_that_logger_kept(quiet, caplog, name, pattern):
    caplog.set_level(logging.INFO)
    logger = logging.getLogger(name)
    logger.warning(pattern.replace("\\", "") + " ...")
    logger.warning("something the user should see")
    assert [r.getMessage() for r in caplog.records if r.name == name] == ["something the user should see"]


def test_idempotent():
    quiet_library_warnings()
    quiet_library_warnings()
    for name, _ in SILENCED_LOGS:
        assert len(logging.getLogger(name).filters) == len([n for n, _ in SILENCED_LOGS if n == name])


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a CPU or CUDA machine with or without Transformer Engine / apex."""
    import importlib.machinery
    import importlib.util
    import sys
    import types

    import torch

    real_find_spec = importlib.util.find_spec
    monkeypatch.delenv("V2PE_KERNEL_NOTICE_SHOWN", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)

    def make(cuda: bool, te: str = "absent", apex: bool = False):
        from v2pe_megatron.runtime import quiet

        monkeypatch.setattr(quiet, "_nvidia_driver", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        present = {"transformer_engine": te != "absent", "apex": apex}

        def find_spec(name, *a, **k):
            if name in present:
                return importlib.machinery.ModuleSpec(name, None) if present[name] else None
            return real_find_spec(name, *a, **k)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        if te == "broken":  # the import fails, as a CUDA 12 TE next to a CUDA 13 torch does
            monkeypatch.setitem(sys.modules, "transformer_engine", None)
        elif te == "works":
            for mod in ("transformer_engine", "transformer_engine.pytorch"):
                monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))

    return make


def test_on_cpu_megatrons_fallback_warnings_stay_hidden_and_nothing_replaces_them(machine, capsys):
    machine(cuda=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_library_warnings()
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning)
    assert not seen and capsys.readouterr().err == ""


def test_on_cuda_without_te_one_line_says_what_falls_back_and_what_to_install(machine, capsys, monkeypatch):
    machine(cuda=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_library_warnings()
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning)
        quiet_library_warnings()  # again (and in the ranks a launcher starts): said once
    err = capsys.readouterr().err
    assert not seen  # megatron's four lines are replaced by ours
    assert err.count("\n") == 1 and err.startswith("v2pe-megatron: Transformer Engine is not installed")
    assert "torch's Adam" in err and "pip install --no-build-isolation -c constraints.txt -e '.[gpu]'" in err
    monkeypatch.delenv("V2PE_KERNEL_NOTICE_SHOWN")
    monkeypatch.setenv("RANK", "3")
    quiet_library_warnings()
    assert capsys.readouterr().err == ""  # rank 0 says it for the job


@pytest.mark.parametrize("te, apex, fragment", [
    ("broken", False, "Transformer Engine does not load (ModuleNotFoundError"),
    ("absent", True, "the optimizer is apex's fused Adam"),
    ("works", False, None),
])
def test_kernel_notice_names_the_cause(machine, te, apex, fragment):
    from v2pe_megatron.runtime.quiet import kernel_notice

    machine(cuda=True, te=te, apex=apex)
    notice = kernel_notice()
    assert (notice is None) if fragment is None else (fragment in notice), notice


def test_no_torch_import_without_an_nvidia_driver():
    """`v2pe-train --print-sbatch` on a login node: the notice's check does not import torch there."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if os.path.exists("/proc/driver/nvidia/version"):
        pytest.skip("an NVIDIA driver is present: the check imports torch here, as it should")
    code = ("import sys; from v2pe_megatron.runtime.quiet import quiet_library_warnings; "
            "quiet_library_warnings(); assert 'torch' not in sys.modules, 'torch imported'")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# megatron-core's tensor_parallel/layers.py, once per TP rank when CUDA_DEVICE_MAX_CONNECTIONS is not 1
MAX_CONNECTIONS = ("When using async grad allreduce it is recommended to set the environment variable "
                   "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup")


@pytest.mark.parametrize("cuda", [False, True])
def test_cuda_device_max_connections_advice_is_hidden_on_the_cpu_only(machine, cuda, capsys):
    machine(cuda=cuda)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_library_warnings()
        warnings.warn(MAX_CONNECTIONS, UserWarning)
        warnings.warn(MAX_CONNECTIONS.replace("async grad allreduce", "sequence parallelism"), UserWarning)
    assert len(seen) == (2 if cuda else 0)  # on a GPU it is a speed fix the user can make


@pytest.mark.parametrize("cli", ["data", "eval"])
def test_clis_silence_library_warnings_before_their_parsers_import_megatron(cli, monkeypatch):
    # Their --help builds a parser that imports data.needles, which imports megatron-core: the
    # silencing must come first (megatron warns once per process, at import).
    import importlib

    from v2pe_megatron.runtime import quiet

    class Silenced(Exception):
        pass

    def first(*a, **k):
        raise Silenced

    monkeypatch.setattr(quiet, "quiet_library_warnings", first)
    main = importlib.import_module(f"v2pe_megatron.cli.{cli}").main
    with pytest.raises(Silenced):  # not SystemExit from --help: nothing was parsed yet
        main(["--help"])
