"""Initial weights that do not depend on the parallel layout.

megatron initialises each rank's shard with that rank's RNG streams: a TP=2 rank draws its half of
a weight from its own tensor-parallel generator, and a second pipeline stage draws its first layer
from the same generator state that the first stage uses for layer 0. So the same recipe at TP=2 or
PP=2 starts from other weights than at 1 rank, and its loss curve differs by a few percent.

The reference is the model as one rank builds it (TP=1, PP=1, CP=1) from ``train.seed``. Context and
data parallelism do not change what a rank builds at TP=1/PP=1, so those layouts already start from
it. For every other layout, global rank 0 runs :func:`main` in a subprocess (its own 1-rank process
group: megatron's parallel state is per process), which builds that reference model and saves it as
a torch_dist weights checkpoint; every rank then loads it at its own layout, and megatron reshards.

Cost, paid once per run started from scratch (never on resume or with ``checkpoint.pretrained``):
one extra model build on rank 0's device and a weights save + load. At InternVL2-2B scale (2.2B
parameters) that is ~8.9 GB of fp32 weights (4.4 GB in bf16) held once more by the subprocess on
rank 0's device while the other ranks wait, the same size on disk, and about the time of a weights
save plus a resharding load (tens of seconds on a node's local disk); on the tiny recipe, ~10 s on
2 CPU cores, mostly the subprocess's imports. The file is written in ``checkpoint.dir`` when set
(shared by all nodes), else in the system temp folder (single-node runs only), and deleted after
every rank loaded it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from v2pe_megatron.config import Recipe, to_yaml
from v2pe_megatron.parallel.layout import Layout

# Environment a launcher sets for a rank; the subprocess is a world of its own.
_RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RUN_ID", "SLURM_PROCID",
             "SLURM_NTASKS", "SLURM_LOCALID")


def layout_dependent(layout: Layout) -> bool:
    """Whether megatron's own initialisation at this layout differs from the 1-rank reference."""
    return layout.tp > 1 or layout.pp > 1 or getattr(layout, "virtual_pp", 1) > 1


def reference_recipe(recipe: Recipe) -> Recipe:
    """The same model on one rank: no model parallelism of any kind."""
    par = replace(recipe.parallel, tp=1, pp=1, cp=1, dp=1, pp_layers=[], sequence_parallel=False,
                  use_distributed_optimizer=False, hierarchical_cp_sizes=[], cp_comm_type="p2p")
    if hasattr(par, "virtual_pp"):
        par = replace(par, virtual_pp=1)
    return replace(recipe, parallel=par)


def write_reference_weights(recipe: Recipe, out: str | os.PathLike, timeout_s: float = 3600) -> None:
    """Build the 1-rank reference model in a subprocess and save its weights to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe_file = out / "recipe.yaml"
    recipe_file.write_text(to_yaml(reference_recipe(recipe)))
    env = {k: v for k, v in os.environ.items() if k not in _RANK_ENV}
    r = subprocess.run([sys.executable, "-m", "v2pe_megatron.training.init_weights", str(recipe_file),
                        str(out / "weights")], env=env, capture_output=True, text=True, timeout=timeout_s)
    if r.returncode != 0:
        raise RuntimeError(f"building the reference initial weights failed (exit {r.returncode}):\n"
                           f"{r.stdout[-2000:]}{r.stderr[-4000:]}")


def load_reference_init(recipe: Recipe, model: list[torch.nn.Module]) -> None:
    """Collective: replace ``model``'s weights (this rank's chunks) by the 1-rank reference ones."""
    import socket

    from v2pe_megatron.training.checkpointing import load_model_weights

    rank0 = dist.get_rank() == 0
    base = recipe.checkpoint.dir
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    if not base and len(set(hosts)) > 1:
        raise RuntimeError("a run over several nodes needs checkpoint.dir (a folder all nodes see) to share "
                           "its initial weights between layouts")
    where = [None]
    if rank0:
        if base:
            Path(base).mkdir(parents=True, exist_ok=True)
        where[0] = tempfile.mkdtemp(prefix=".init-", dir=base or None)
    dist.broadcast_object_list(where, src=0)
    err = [None]
    if rank0:
        try:
            write_reference_weights(recipe, where[0])
        except Exception as e:  # every rank must leave the barrier with the same outcome
            err[0] = str(e)
    dist.broadcast_object_list(err, src=0)
    try:
        if err[0]:
            raise RuntimeError(err[0])
        load_model_weights(Path(where[0]) / "weights", model)
        dist.barrier()
    finally:
        if rank0:
            shutil.rmtree(where[0], ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from v2pe_megatron.config import load_recipe, validate
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import resolve_spec
    from v2pe_megatron.runtime.distributed import initialize_model_parallel, model_parallel
    from v2pe_megatron.training.checkpointing import save_model_weights

    recipe_file, out = argv if argv is not None else sys.argv[1:]
    recipe = load_recipe(recipe_file)
    layout = validate(recipe, world_size=1, spec=resolve_spec(recipe.model.spec, recipe.model.dtype))
    with model_parallel(1, 1, 1, seed=recipe.train.seed):
        # The training loop's own sequence: seed, then build (model_parallel seeded it already; again
        # so this module never depends on that detail).
        initialize_model_parallel(1, 1, 1, seed=recipe.train.seed)
        model = build_model(recipe.model, layout, recompute="none")
        save_model_weights(out, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
