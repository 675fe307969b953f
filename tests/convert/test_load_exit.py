"""``hf.load`` in a plain script: the 1-rank process group it sets up is torn down cleanly, when the
model is released or at interpreter exit, never by a generator collected during the interpreter's
teardown ("Exception ignored in: <generator object model_parallel> ... sys.meta_path is None")."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys, types
    import torch.distributed as dist
    from v2pe_megatron import hf

    first = hf.load(sys.argv[1])
    first.release_process_group()          # released on request
    print("released", dist.is_initialized())
    # Alive until the interpreter exits, in a module other than __main__ and in a reference cycle:
    # the case that used to leave the group to a generator finalized during teardown.
    holder = types.ModuleType("holder")
    sys.modules["holder"] = holder
    holder.model = hf.load(sys.argv[1])
    holder.cycle = {"model": holder.model}
    holder.cycle["self"] = holder.cycle
    print("loaded", dist.is_initialized())
""")


@pytest.mark.slow
def test_hf_load_in_a_script_exits_cleanly(tmp_path):
    from v2pe_megatron.testing.hf_fixtures import remote_checkpoint, tiny_model_config

    remote_checkpoint(str(tmp_path / "ckpt"), tiny_model_config())
    (tmp_path / "use.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(tmp_path / "use.py"), str(tmp_path / "ckpt")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["released", "False", "loaded", "True"], res.stdout
    assert "Exception ignored" not in res.stderr and "sys.meta_path is None" not in res.stderr, res.stderr
