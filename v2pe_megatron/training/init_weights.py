"""Initial weights that are a function of the model and ``train.seed`` only, drawn shard by shard.

megatron initialises each rank's shard with that rank's RNG streams: a TP=2 rank draws its half of
a weight from its own tensor-parallel generator, and a later pipeline stage draws its first layer
from the generator state the first stage uses for layer 0. Its initial weights therefore change with
the layout, and so does the loss curve (by a few percent).

Here every value has an address that no layout changes: the tensor's global checkpoint key (as
megatron's sharded state dict reports it, e.g. ``language_model.decoder.layers.mlp.linear_fc1.weight``),
its index along the prepended axes (the global layer number), and its position in the tensor's
global shape. Each tensor, seen as 2-D ``[shape[0], prod(shape[1:])]``, is cut into tiles of
``TILE_ROWS`` x ``TILE_COLS`` (fewer columns when the tensor is narrower; then more rows, so a tile
holds about ``TILE_ROWS * TILE_COLS`` values); a tile's values are numpy's ``standard_normal`` (or
``random``) stream of a ``PCG64`` generator seeded with sha256(seed, key, layer, tile), filled row by
row. A rank draws, on the host, only the tiles that meet its shard (rows past what it needs are not
drawn: the stream is filled in order, so a prefix is the same whatever its length), scales them, and
copies its part into the parameter, one band of ``TILE_ROWS`` rows at a time. So:

- every TP/PP/virtual-PP/CP/DP layout, CPU or GPU, starts from the same weights, tensor by tensor,
  bit for bit (``tests/training/test_init_weights.py``); rows past the vocabulary that TP padding adds
  are drawn like the rest and do not change the real rows;
- no process builds or holds the whole model, and the init needs, on top of the rank's own shard,
  one band per drawing thread (``TILE_ROWS`` rows of one shard: 8 MiB at InternVL2-2B's widest, the
  fc2 weight at TP=1);
- a rank draws about its own shard, not the whole tensors it holds part of (up to one tile at each
  shard edge that does not fall on a multiple of the tile size).

The distribution of each tensor is the one megatron (or torch, for the few torch modules) gives it
(:func:`init_kind` names the rule for each key): linear weights normal with std from the owning
``TransformerConfig``'s ``init_method`` (qkv, fc1, projector ``linear_1``, output layer),
``output_layer_init_method`` (attention and MLP output projections, projector ``linear_2``) or
``embedding_init_method`` (word embeddings); biases zero, norm weights one and norm biases zero; the
ViT's class and position embeddings normal(``VisionEmbeddings.init_std``), its patch conv torch's
default (uniform +-1/sqrt(fan_in)), its layer scales ``LayerScaleBDA.init_value``. A key without a
rule is an error that names it; a parameter left unwritten is an error too.

Norms are the only tensors whose checkpoint key differs between the local and the TE spec
(``input_layernorm.weight`` vs ``self_attention.linear_qkv.layer_norm_weight``, and the biases alike);
they are constants, so every random tensor has the same key, and the same values, in both specs.

Determinism: the values come from numpy's ``Generator(PCG64)`` in float32 (numpy keeps these streams
stable across releases since 1.17; the ziggurat's rare tail and wedge draws call the C library's
``expf``/``logf``, the only step a different libm could move by an ulp) and reach the parameter by a
copy, rounded once to the parameter's dtype. They do not depend on torch's version, its CPU vector
path, the device or the number of drawing threads.

Cost (``benchmarks/init_weights.py``, ``benchmarks/RESULTS.md``): ~2.8 s per GB of fp32 values drawn per
thread on this project's 2-core CI machine; numpy fills without the GIL, so ``threads`` (default: the
cores of this rank's share of the node, at most 8) divide that where cores are free. A rank draws
about its own shard: InternVL2-2B (2.2 B parameters, 8.9 GB fp32) costs a TP=1 rank ~25 s on one
thread, a TP=8 rank ~1/8 of that (one LLM layer: 1.28 s whole, 0.11 s for a TP=8 rank's shards);
data-parallel replicas draw the same values side by side. Run by the training loop only when a run
starts from scratch: never on resume, never with ``checkpoint.pretrained`` (the weights come from
there). Frozen parts are initialised like the rest (freezing a part that starts from random weights
is the recipe's choice). megatron's own initialisation still runs when the model is built (on this
rank's shard, on its device) and is overwritten.

``python -m v2pe_megatron.training.init_weights RECIPE OUT`` writes a recipe's initial weights as a
weights-only torch_dist folder, building the model in one process (tests, small models).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import numpy as np
import torch

log = logging.getLogger("v2pe_megatron.train")

TILE_ROWS = 256
TILE_COLS = 256
_TILE_ELEMS = TILE_ROWS * TILE_COLS


@dataclass(frozen=True)
class Init:
    """How one tensor starts: ``normal`` (``value`` = std), ``uniform`` (+-``value``) or
    ``constant`` (every element ``value``)."""

    kind: str
    value: float


# (pattern on the checkpoint key, rule). First match wins. Rules name megatron's init methods of the
# TransformerConfig that owns the key (the tower's for vision_model.* and projector.*, the LLM's else).
_RULES: tuple[tuple[str, str], ...] = (
    (r"(norm\.weight|layer_norm_weight)$", "ones"),        # local pre-norms, TE fused norms, final norm
    (r"(norm\.bias|layer_norm_bias)$", "zeros"),
    (r"embeddings\.patch_embedding\.(weight|bias)$", "conv_default"),
    (r"embeddings\.(class_embedding|position_embedding)$", "vision_embedding"),
    (r"_bda\.ls$", "layer_scale"),
    (r"\.bias$", "zeros"),                                  # megatron zeroes every linear bias
    (r"word_embeddings\.weight$", "embedding_init_method"),
    (r"(linear_qkv|linear_fc1|linear_1|output_layer)\.weight$", "init_method"),
    (r"(linear_proj|linear_fc2|linear_2)\.weight$", "output_layer_init_method"),
)


def init_kind(key: str) -> str:
    """The rule for a checkpoint key (see the module docstring); KeyError when none applies."""
    for pattern, kind in _RULES:
        if re.search(pattern, key):
            return kind
    raise KeyError(f"no initial-value rule for the parameter {key!r}: add one to init_weights._RULES")


def _normal_std(method, what: str) -> float:
    """The std of one of megatron's init methods (``functools.partial(torch.nn.init.normal_, std=)``)."""
    if getattr(method, "func", None) is not torch.nn.init.normal_ or float(method.keywords.get("mean", 0.0)):
        raise NotImplementedError(f"{what} is {method!r}: only megatron's zero-mean normal init is drawn here")
    return float(method.keywords["std"])


def resolve_init(key: str, model: torch.nn.Module, param_name: str) -> Init:
    """The distribution of ``key`` in ``model``, whose parameter ``param_name`` holds (part of) it."""
    kind = init_kind(key)
    if kind in ("ones", "zeros"):
        return Init("constant", 1.0 if kind == "ones" else 0.0)
    owner = model.get_submodule(param_name.rsplit(".", 1)[0])
    if kind == "conv_default":
        # torch's Conv2d.reset_parameters: kaiming_uniform(a=sqrt(5)) on the weight, the same bound on the bias.
        fan_in = owner.in_channels // owner.groups * int(np.prod(owner.kernel_size))
        return Init("uniform", 1.0 / fan_in**0.5)
    if kind == "vision_embedding":
        return Init("normal", float(owner.init_std))
    if kind == "layer_scale":
        return Init("constant", float(owner.init_value))
    config = getattr(model, key.split(".", 1)[0]).config
    return Init("normal", _normal_std(getattr(config, kind), f"{key}: {kind}"))


def tile_shape(cols: int) -> tuple[int, int]:
    """(rows, cols) of a tile of a 2-D view with ``cols`` columns; depends on nothing else."""
    c = max(1, min(cols, TILE_COLS))
    return max(1, _TILE_ELEMS // c), c


def _generator(seed: int, name: str, tile: tuple[int, int]) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\0{name}\0{tile[0]}\0{tile[1]}".encode()).digest()
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int.from_bytes(digest, "little"))))


def _draw(gen: np.random.Generator, init: Init, n: int) -> np.ndarray:
    if init.kind == "normal":
        out = gen.standard_normal(n, dtype=np.float32)
        out *= np.float32(init.value)
    elif init.kind == "uniform":
        out = gen.random(n, dtype=np.float32)
        out *= np.float32(2.0 * init.value)
        out -= np.float32(init.value)
    else:
        raise ValueError(f"nothing to draw for {init}")
    return out


def band_values(seed: int, name: str, init: Init, cols: int, rows: tuple[int, int],
                col_range: tuple[int, int]) -> np.ndarray:
    """float32 values of ``rows`` x ``col_range`` (half-open) of the 2-D tensor ``name`` with ``cols``
    columns, where ``rows`` lies inside one band of tiles (``tile_shape(cols)[0]`` rows)."""
    tr, tc = tile_shape(cols)
    r0, r1 = rows
    c0, c1 = col_range
    band = r0 // tr
    if (r1 - 1) // tr != band:
        raise ValueError(f"rows {rows} cross a band of {tr} rows")
    out = np.empty((r1 - r0, c1 - c0), dtype=np.float32)
    # Drawn from the band's first row: a tile's stream is its values in row-major order.
    n_rows = r1 - band * tr
    for j in range(c0 // tc, (c1 - 1) // tc + 1):
        a, b = j * tc, min((j + 1) * tc, cols)
        tile = _draw(_generator(seed, name, (band, j)), init, n_rows * (b - a)).reshape(n_rows, b - a)
        lo, hi = max(a, c0), min(b, c1)
        out[:, lo - c0:hi - c0] = tile[r0 - band * tr:, lo - a:hi - a]
    return out


def values(seed: int, name: str, init: Init, shape: tuple[int, ...],
           region: Optional[tuple[slice, ...]] = None) -> torch.Tensor:
    """The initial values of ``region`` (default: all; slices with step 1) of the tensor ``name`` of
    global ``shape``, float32: the reference for what :func:`initialize` copies into a shard."""
    shape = tuple(shape)
    region = tuple(region or ()) + (slice(None),) * (len(shape) - len(region or ()))
    bounds = [s.indices(n)[:2] for s, n in zip(region, shape)]
    if len(shape) > 2 and any(b != (0, n) for b, n in zip(bounds[1:], shape[1:])):
        raise ValueError("a region of a tensor with more than 2 dimensions may cut its first axis only")
    local = tuple(b - a for a, b in bounds)
    if init.kind == "constant":
        return torch.full(local, init.value, dtype=torch.float32)
    cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    (r0, r1), (c0, c1) = bounds[0], (bounds[1] if len(shape) == 2 else (0, cols))
    out = np.empty((r1 - r0, c1 - c0), dtype=np.float32)
    for a, b in _bands(r0, r1, tile_shape(cols)[0]):
        out[a - r0:b - r0] = band_values(seed, name, init, cols, (a, b), (c0, c1))
    return torch.from_numpy(out).reshape(local)


def _bands(r0: int, r1: int, tr: int) -> Iterator[tuple[int, int]]:
    a = r0
    while a < r1:
        b = min(r1, (a // tr + 1) * tr)
        yield a, b
        a = b


@dataclass
class InitReport:
    tensors: int = 0          # ShardedTensors written (per layer)
    elements: int = 0         # values this rank wrote
    drawn: int = 0            # values this rank drew (>= the random part of ``elements``)
    largest_band_bytes: int = 0
    seconds: float = 0.0
    threads: int = 1


def default_threads() -> int:
    """Cores this process may use, shared with the other ranks of its node, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


@dataclass
class Shard:
    """One tensor's part on this rank: ``data`` (a view of parameter ``param``) sits at ``offset`` in
    the tensor ``name`` (checkpoint key + ``[layer]`` per prepended axis) of global ``shape``."""

    name: str
    init: Init
    shape: tuple[int, ...]
    offset: tuple[int, ...]
    data: torch.Tensor
    param: str

    @property
    def region(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.data.shape))


def shards(chunk: torch.nn.Module) -> list[Shard]:
    """Every parameter value of one (unwrapped) model chunk as :class:`Shard` s, from megatron's
    sharded state dict; raises when a parameter is not covered exactly once."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    owner_of = {id(p): (name, p) for name, p in chunk.named_parameters()}
    sd = chunk.sharded_state_dict()
    apply_factories(sd)  # the gated MLP's fc1 -> two ShardedTensors (gate and up rows), views of it
    out, written = [], {}
    for st in nested_values(sd):
        if not isinstance(st, ShardedTensor):
            continue  # TE's _extra_state
        param = st.data if st.data._base is None else st.data._base
        if id(param) not in owner_of:
            raise RuntimeError(f"{st.key}: its sharded tensor is no parameter or view of one")
        pname, _ = owner_of[id(param)]
        npre = st.prepend_axis_num
        name = st.key + "".join(f"[{i}]" for i in st.global_offset[:npre])
        shape, data = tuple(st.global_shape[npre:]), st.data
        if tuple(data.shape) != tuple(st.local_shape) or not data.is_contiguous():
            raise RuntimeError(f"{name}: local data {tuple(data.shape)} does not match its shard")
        if len(shape) > 2 and tuple(data.shape[1:]) != shape[1:]:
            raise RuntimeError(f"{name}: sharded along an axis past the second: {shape} -> {tuple(data.shape)}")
        written[pname] = written.get(pname, 0) + data.numel()
        out.append(Shard(name, resolve_init(st.key, chunk, pname), shape, tuple(st.global_offset[npre:]), data,
                         pname))
    for pname, p in owner_of.values():
        if written.get(pname, 0) != p.numel():
            raise RuntimeError(f"{pname}: its sharded state dict covers {written.get(pname, 0)} of its {p.numel()} "
                               f"values")
    return out


@torch.no_grad()
def initialize(model: torch.nn.Module | list[torch.nn.Module], seed: int, *,
               threads: Optional[int] = None) -> InitReport:
    """Write the initial weights of this rank's model chunks (see the module docstring). Local: no
    collectives, any parallel layout; the model must be built (megatron's parallel state set up)."""
    from v2pe_megatron.training.checkpointing import unwrap

    t0 = time.perf_counter()
    threads = threads or default_threads()
    report = InitReport(threads=threads)
    work = []
    for chunk in (model if isinstance(model, list) else [model]):
        for sh in shards(unwrap(chunk)):
            report.tensors += 1
            report.elements += sh.data.numel()
            if sh.init.kind == "constant" or sh.data.numel() == 0:
                sh.data.fill_(sh.init.value)
                continue
            cols = int(np.prod(sh.shape[1:])) if len(sh.shape) > 1 else 1
            local = sh.data.view(sh.data.shape[0], -1)
            r0 = sh.offset[0]
            c0 = sh.offset[1] if len(sh.shape) == 2 else 0
            c1 = c0 + local.shape[1]
            tr, tc = tile_shape(cols)
            for a, b in _bands(r0, r0 + local.shape[0], tr):
                work.append((sh.name, sh.init, cols, (a, b), (c0, c1), local[a - r0:b - r0]))
                # drawn: from the band's first row, whole tiles across
                report.drawn += (b - a // tr * tr) * (min(cols, -(-c1 // tc) * tc) - c0 // tc * tc)
                report.largest_band_bytes = max(report.largest_band_bytes, (b - a) * (c1 - c0) * 4)

    def fill(item) -> None:
        name, init, cols, rows, col_range, dst = item
        with torch.no_grad():  # grad mode is per thread
            dst.copy_(torch.from_numpy(band_values(seed, name, init, cols, rows, col_range)))

    if threads > 1 and len(work) > 1:
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(fill, work):  # re-raises a worker's error
                pass
    else:
        for item in work:
            fill(item)
    report.seconds = time.perf_counter() - t0
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        log.info("initial weights from seed %d: %.2f GB drawn on this rank in %.1f s (%d threads)", seed,
                 report.drawn * 4 / 1e9, report.seconds, threads)
    return report


def one_rank_recipe(recipe):
    """The same model on one rank: no model parallelism of any kind."""
    par = replace(recipe.parallel, tp=1, pp=1, cp=1, dp=1, pp_layers=[], sequence_parallel=False,
                  use_distributed_optimizer=False, hierarchical_cp_sizes=[], cp_comm_type="p2p", virtual_pp=1)
    return replace(recipe, parallel=par)


def main(argv: list[str] | None = None) -> int:
    from v2pe_megatron.config import load_recipe, validate
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import resolve_spec
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.training.checkpointing import save_model_weights

    recipe_file, out = argv if argv is not None else sys.argv[1:]
    recipe = one_rank_recipe(load_recipe(recipe_file))
    layout = validate(recipe, world_size=1, spec=resolve_spec(recipe.model.spec, recipe.model.dtype))
    with model_parallel(1, 1, 1, seed=recipe.train.seed):
        model = build_model(recipe.model, layout, recompute="none")
        initialize(model, recipe.train.seed)
        save_model_weights(out, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
