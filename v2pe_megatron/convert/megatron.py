"""HF checkpoint <-> megatron torch_dist checkpoint, one tensor at a time.

Import (collective over ``tp x pp`` ranks): every rank builds its own stage of the model on the
``meta`` device (megatron's sharded state dict without memory), checks every parameter against the
HF tensors (all ranks together: every HF tensor used), and saves with megatron's
``dist_checkpointing`` while each tensor's data is made from HF only when the writer reaches it
(read, transformed, sliced to the rank's tensor-parallel shard; one at a time). Because
megatron saves global tensors with their offsets, the checkpoint loads at any TP/PP/DP; the
embedding and output layer are saved with their padded rows flagged as such
(``allow_shape_mismatch``), so a vocabulary padded for TP=2 loads at TP=1 or 4 too.

Export (one process, no model): checks the checkpoint's tensor list against the table, then loads
one checkpoint tensor at a time (megatron stacks each kind of layer tensor over the layers) and
writes its HF tensors into sharded safetensors; any layout the checkpoint was saved at.

Beside the weights: ``model.yaml`` (the recipe's ``model:`` section, plus ``v2pe:`` for a V2PE source)
and ``hf_config.json`` (the source's ``config.json``, for keys we do not model). Output folders are
written as ``<out>.tmp`` and renamed when complete; an existing ``<out>`` needs ``force``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import yaml

from v2pe_megatron.config import ModelConfig
from v2pe_megatron.convert.errors import ConvertWriteError, HFCheckpointError
from v2pe_megatron.convert.hf_config import hf_config_from_model, v2pe_recipe_section
from v2pe_megatron.convert.load import hf_model_config
from v2pe_megatron.convert.mappings import GatedMLP, Mapping, check_hf_shapes, nonfinite, weight_map
from v2pe_megatron.convert.safetensors_io import SafetensorsReader, ShardWriter, uniform_dtype
from v2pe_megatron.model.checkpoint_names import checkpoint_name, stored_name
from v2pe_megatron.runtime.paths import unwritable_dir

MODEL_YAML = "model.yaml"
SOURCE_CONFIG = "hf_config.json"
LAYOUTS = {"remote-code": "remote", "transformers": "native", "remote": "remote", "native": "native"}
# transformers' save_pretrained spelling of the native layout (hf.load accepts both)
_NATIVE_SAVE = (("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))
_VOCAB_PARAMS = ("language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight")


@dataclass
class ConvertResult:
    out: str
    seconds: float
    tensors: int
    layout: str
    tp: int = 1
    pp: int = 1
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# output folders
# ---------------------------------------------------------------------------------------------
def staging_dir(out: str | os.PathLike) -> Path:
    """Where an output is written until it is complete (and verified): ``<out>.tmp``."""
    out = Path(out)
    return out.with_name(out.name + ".tmp")


def _replaced_dir(out: Path) -> Path:
    return out.with_name(out.name + ".replaced.tmp")


def check_out(out: str | os.PathLike, force: bool, inputs: Optional[dict[str, Any]] = None) -> None:
    """``out`` may be written: it is not, is not inside and does not contain any of ``inputs``
    (flag -> path; links resolved), nor are the folders the converter clears beside it (``<out>.tmp``,
    ``<out>.replaced.tmp``), since ``--force`` replaces ``out`` and a stale ``<out>.tmp`` is
    removed; it does not exist unless ``force``; and the folder it goes in is writable."""
    p = Path(out)
    for flag, src in (inputs or {}).items():
        if src is None:
            continue
        s = Path(src).resolve()
        for o in (p, staging_dir(p), _replaced_dir(p)):
            r = o.resolve()
            how = "is" if r == s else "is inside" if s in r.parents else "contains" if r in s.parents else None
            if how:
                what = f"--out {p}" if o == p else f"{o} (the folder --out {p} is written in)"
                resolved = f" ({r} {how} {s}, links resolved)" if (r, s) != (o.absolute(), Path(src).absolute()) else ""
                raise HFCheckpointError(f"{what} {how} {flag} {src}{resolved}: the converter clears and replaces "
                                        f"its output, which would destroy its input; choose an --out outside {src}")
    if p.exists() and not force:
        raise FileExistsError(f"{p} exists; pass --force to replace it (it is replaced only when the new one is complete)")
    # the output and its staging folder are made beside each other: found now, not after the work
    why = unwritable_dir(p.absolute().parent)
    if why is not None:
        raise HFCheckpointError(f"--out {p} cannot be written: {why}; choose another --out")


def publish(staged: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename the finished ``staged`` folder to ``out``; an old ``out`` (``force``) goes aside first,
    deleted last."""
    staged, out = Path(staged), Path(out)
    old = _replaced_dir(out)
    if out.exists():
        out.rename(old)
    staged.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def discard(staged: str | os.PathLike) -> None:
    """Remove an unfinished (or unverified) output: nothing half-written stays behind."""
    shutil.rmtree(staged, ignore_errors=True)


def _write_failed(e: OSError, staged: Path, out: Path, need: int, everywhere: bool = False) -> ConvertWriteError:
    """The one message for a write that failed: the cause (a full disk by name), the sizes, and that
    nothing was published."""
    where = next((p for p in (staged, *staged.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(where).free
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up"}.get(e.errno, e.strerror or str(e))
    return ConvertWriteError(f"writing {out} failed: {what} ({e}); the output needs about {need / 1e9:.2f} GB, "
                             f"{where} has {free / 1e9:.2f} GB free now that the partial {staged.name} is removed. "
                             f"Nothing was written to {out}" + (" (the existing one is unchanged)"
                                                                if out.exists() else ""), everywhere)


def model_section(mc: ModelConfig) -> dict[str, Any]:
    d = dataclasses.asdict(mc)
    d.pop("preset", None)
    return d


def write_model_yaml(folder: Path, mc: ModelConfig, source_cfg: Optional[dict]) -> None:
    doc: dict[str, Any] = {"model": model_section(mc)}
    v2pe = v2pe_recipe_section(source_cfg or {})
    if v2pe:
        doc["v2pe"] = v2pe
    header = ("# The recipe sections that match this checkpoint (written by v2pe-convert): copy them into a\n"
              "# recipe and train with checkpoint.pretrained=<this folder>.\n")
    (folder / MODEL_YAML).write_text(header + yaml.safe_dump(doc, sort_keys=False))


def read_model_yaml(path: str | os.PathLike) -> ModelConfig:
    """The ``model`` section of a model.yaml or any recipe, as the recipe loader reads it."""
    from v2pe_megatron.config import RecipeError, load_recipe

    try:
        return load_recipe(path).model
    except RecipeError as e:
        raise HFCheckpointError(f"{path}: {e}") from e


def find_model_yaml(ckpt: str | os.PathLike) -> Optional[Path]:
    """model.yaml in the checkpoint folder, its torch_dist folder or the folder above (training runs)."""
    from v2pe_megatron.training.checkpointing import weights_dir

    p = Path(ckpt)
    for c in (p, weights_dir(p), p.parent):
        if (c / MODEL_YAML).is_file():
            return c / MODEL_YAML
    return None


# ---------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _agree(problem: Optional[str]) -> None:
    """Collective: raise on every rank the first problem any rank found (no rank left in a collective)."""
    problems = [problem]
    if dist.is_initialized() and dist.get_world_size() > 1:
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
    found = [p for p in problems if p]
    if found:
        raise HFCheckpointError(found[0])


def _global_names(model) -> dict[str, str]:
    """This stage's parameter names -> the whole model's checkpoint names (pipeline stages number
    their layers from 0; the local spec's norm modules go by Transformer Engine's names on disk)."""
    prefix = "language_model.decoder.layers."
    offsets = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(model.language_model.decoder.layers)}
    out = {}
    for name, _ in model.named_parameters():
        if name.startswith(prefix):
            i, rest = name[len(prefix):].split(".", 1)
            out[name] = checkpoint_name(f"{prefix}{offsets[i]}.{rest}")
        else:
            out[name] = checkpoint_name(name)
    return out


def _global_shape(name: str, p: torch.Tensor, tp: int, vocab: int) -> tuple[int, ...]:
    shape = list(p.shape)
    if tp > 1 and getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= tp
    if name in _VOCAB_PARAMS:
        shape[0] = vocab  # the HF side has no padding rows
    return tuple(shape)


def _local_shard(mp: Mapping, name: str, full: torch.Tensor, p: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's part of the whole megatron tensor ``full``, as megatron lays it out."""
    if name in _VOCAB_PARAMS and full.shape[0] < p.shape[0] * tp:  # padded vocabulary: zero rows
        full = torch.cat([full, full.new_zeros(p.shape[0] * tp - full.shape[0], *full.shape[1:])])
    if tp == 1 or not getattr(p, "tensor_model_parallel", False):
        return full
    if isinstance(mp, GatedMLP):  # each rank holds [gate_i; up_i]
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]])
    return full.chunk(tp, dim=p.partition_dim)[tp_rank]


def _storage_id(t: torch.Tensor) -> int:
    """Which storage ``t`` views. megatron hands the writer detached views of the parameters (chunks,
    axes prepended), new tensor objects with no ``_base``; a meta tensor's storage still is the
    parameter's, and the parameters are alive for as long as the ids are used."""
    return t.untyped_storage()._cdata


class _Producer:
    """This rank's megatron parameters, made from the HF tensors one at a time when the writer asks.

    The model lives on the ``meta`` device: its parameters give megatron's sharded state dict (keys,
    global shapes, offsets, replicas, the gated-MLP split) and nothing else. :meth:`check` validates
    every parameter against the table and the HF shapes before anything is written;
    :meth:`tensor` turns one meta tensor the writer reaches (a parameter or a view of one) into its
    data, built from HF like this: read, transform, slice to the rank's TP shard, then the view's
    strides. The last parameter built is kept, so a parameter split into several checkpoint tensors
    (the gated fc1's gate and up halves) is read once."""

    def __init__(self, model, mc: ModelConfig, table: list[Mapping], reader: SafetensorsReader, tp: int,
                 progress: bool = False):
        from megatron.core import parallel_state as ps
        from tqdm import tqdm

        self.mc, self.reader, self.tp = mc, reader, tp
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.by_mcore = {mp.mcore: mp for mp in table}
        names = _global_names(model)
        self.params = {names[k]: p for k, p in model.named_parameters()}
        self.by_storage = {_storage_id(p): g for g, p in self.params.items()}
        self.written: set[str] = set()
        self._last: tuple[Optional[str], Optional[torch.Tensor]] = (None, None)
        self.bar = tqdm(total=len(self.params), desc="import", unit="tensor", disable=not progress or _rank() != 0)
        extra_state = [k for k in model.state_dict() if k not in names and not k.endswith("_extra_state")]
        if extra_state:
            raise HFCheckpointError(f"megatron state {extra_state[0]} is not a parameter; the converter does not know it")

    def check(self) -> set[str]:
        """Every parameter has its HF tensors, in the right shapes; returns the HF tensors used."""
        used: set[str] = set()
        for g, p in self.params.items():
            mp = self.by_mcore.get(g)
            if mp is None:
                raise HFCheckpointError(f"megatron parameter {g} has no HF tensor in the table")
            missing = [n for n in mp.hf if n not in self.reader]
            if missing:
                raise HFCheckpointError(f"HF tensor {missing[0]} (for {g}) is missing from the checkpoint")
            check_hf_shapes(mp, [self.reader.shape(n) for n in mp.hf],
                            _global_shape(g, p, self.tp, self.mc.language.vocab_size))
            used.update(mp.hf)
        return used

    def _build(self, g: str) -> torch.Tensor:
        mp, p = self.by_mcore[g], self.params[g]
        hf = [self.reader.get(n) for n in mp.hf]
        for n, t in zip(mp.hf, hf):
            bad = nonfinite(t)
            if bad:
                raise HFCheckpointError(f"HF tensor {n} (in {self.reader.file_of(n)}, for megatron parameter {g}) "
                                        f"holds {bad}: the checkpoint's weights are not finite; use an intact copy "
                                        f"of the checkpoint")
        full = mp.to_megatron(hf)
        del hf
        shard = _local_shard(mp, g, full, p, self.tp, self.tp_rank)
        if tuple(shard.shape) != tuple(p.shape):
            raise HFCheckpointError(f"{g}: this rank's shard is {tuple(shard.shape)}, the model has "
                                    f"{tuple(p.shape)} (tp={self.tp})")
        shard = shard.to(p.dtype).contiguous()
        self.written.add(g)
        self.bar.update(1)
        return shard

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        g = self.by_storage.get(_storage_id(t))
        if g is None:  # a tensor of megatron's own, not a parameter: nothing would set it
            raise HFCheckpointError(f"megatron's state dict holds a {tuple(t.shape)} tensor that is not a "
                                    f"parameter; the converter does not know it")
        if self._last[0] != g:
            self._last = (None, None)  # the previous one goes before the next is read
            self._last = (g, self._build(g))
        data = self._last[1]  # contiguous like the parameter, but may itself be a slice (a TP shard)
        return data.as_strided(t.size(), t.stride(), data.storage_offset() + t.storage_offset())


def _streaming_strategy(producer: _Producer):
    """megatron's torch_dist save strategy, with the tensor data made one write item at a time.

    megatron's own writer (``FileSystemWriterAsync``) resolves every item before it writes the first,
    which would hold the whole model; torch's ``FileSystemWriter`` with one thread resolves one item,
    writes it, and drops it. Everything else is megatron's: the translation of its sharded state
    dict into torch's (``mcore_to_pyt_state_dict``), its save planner, its metadata and common files
    (``dist_checkpointing.save`` around this strategy), so the checkpoint is the one megatron writes."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, TorchDistSaveShardedStrategy, _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict)
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class Planner(MCoreSavePlanner):
        def lookup_object(self, index):
            obj = super().lookup_object(index)
            if isinstance(obj, torch.Tensor) and obj.is_meta:
                return producer.tensor(obj)
            return obj

    class Strategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            planner = Planner(dedup_replicated_tensors=not self.keep_only_main_replica,
                              flatten_state_dict=False, flatten_sharded_tensors=False)
            # no copy-ahead: on a machine with CUDA torch would otherwise pick its overlapping loader,
            # which resolves items ahead of the write; the serial one holds one item, on any machine
            writer = FileSystemWriter(checkpoint_dir, single_file_per_rank=True, thread_count=1,
                                      per_thread_copy_ahead=0)
            dcp_save(mcore_to_pyt_state_dict(sd, False), storage_writer=writer, planner=planner)

    return Strategy()


def _check_all_written(producer: _Producer) -> None:
    """Collective: every parameter of the model (all ranks) was written by some rank. Replicated
    parameters are written by their main replica only; megatron's save checked that the written
    shards tile every checkpoint tensor."""
    mine, written = set(producer.params), producer.written
    if dist.get_world_size() > 1:
        both = [None] * dist.get_world_size()
        dist.all_gather_object(both, (mine, written))
        mine = set().union(*(m for m, _ in both))
        written = set().union(*(w for _, w in both))
    never = sorted(mine - written)
    if never:
        raise HFCheckpointError(f"megatron parameter {never[0]} was never written ({len(never)} in all)")


def _save_streaming(path: Path, model, producer: _Producer) -> None:
    """Collective: the weights folder, each tensor made from HF as it is written. A problem found
    while writing (a NaN in an HF tensor, a full disk) is raised on every rank, naming the tensor (or
    the file)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    if _rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    try:
        dist_checkpointing.save(model.sharded_state_dict(), str(path), sharded_strategy=_streaming_strategy(producer))
    except CheckpointException as e:
        from v2pe_megatron.training.checkpointing import exception_causes

        # torch gathers each rank's failure onto every rank
        failures = list(exception_causes(e))
        for kind in (HFCheckpointError, OSError):
            ours = [f for f in failures if isinstance(f, kind)]
            if ours:
                ours[0].everywhere = True  # the same failure on every rank
                raise ours[0] from e
        raise
    producer._last = (None, None)
    producer.bar.close()
    dist.barrier()


@contextlib.contextmanager
def _parallel(tp: int, pp: int):
    """megatron state for ``tp x pp`` on the job's ranks (torchrun / srun), or a 1-rank group."""
    from v2pe_megatron.runtime.distributed import model_parallel, process_group

    with contextlib.ExitStack() as st:
        if not dist.is_initialized() and ("RANK" in os.environ or "SLURM_PROCID" in os.environ):
            st.enter_context(process_group())
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world != tp * pp:
            raise HFCheckpointError(f"import at tp={tp} pp={pp} needs {tp * pp} ranks, this job has {world}; "
                                    f"start it with {tp * pp} tasks (or let v2pe-convert start them)")
        st.enter_context(model_parallel(tp, pp))
        yield


@dataclass
class ImportPlan:
    """What :func:`check_import` read: the model, the HF layout and config, the open reader, and the
    bytes the output will take."""

    mc: ModelConfig
    layout: str
    cfg: dict
    reader: SafetensorsReader
    need_bytes: int


def check_import(hf_dir: str | os.PathLike, out: str | os.PathLike, *, tp: int = 1, pp: int = 1,
                 spec: str = "local", force: bool = False, img_context_token_id: Optional[int] = None) -> ImportPlan:
    """Everything an import can be refused for, before any rank starts or model is built: the output
    path (see :func:`check_out`), ``config.json`` and the token ids, every shard's header, the spec,
    and whether ``tp x pp`` can split this model (``parallel/layout.py``'s rules). Reads only
    config.json, the tokenizer files and the safetensors headers. Raises HFCheckpointError,
    LayoutError, FileExistsError."""
    from v2pe_megatron.parallel.layout import Layout, LayoutError, resolve_spec

    check_out(out, force, {"--hf": hf_dir})
    mc, layout, cfg = hf_model_config(hf_dir, img_context_token_id)
    reader = SafetensorsReader(hf_dir, native=layout == "native")
    mc.dtype = uniform_dtype(reader.dtype(k) for k in reader.keys()) or "fp32"
    mc.spec = resolve_spec(spec, mc.dtype)
    # the split's rules only: no forward runs, so the attention backend's do not apply
    problems = Layout(tp=tp, pp=pp).problems(model=mc)
    if problems:
        tps = [t for t in range(1, 129) if not Layout(tp=t).problems(model=mc)]
        pps = [q for q in range(1, mc.language.num_layers + 1) if not Layout(pp=q).problems(model=mc)]
        more = f" (and {len(problems) - 1} more rule{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise LayoutError(f"--tp {tp} --pp {pp} cannot split the model of {Path(hf_dir) / 'config.json'}: "
                          f"{problems[0]}{more}. This model takes --tp {', '.join(map(str, tps))} and --pp "
                          f"{', '.join(map(str, pps))}")
    need = sum(reader.nbytes(k) for k in reader.keys())
    return ImportPlan(mc, layout, cfg, reader, need)


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, *, tp: int = 1, pp: int = 1, spec: str = "local",
              force: bool = False, progress: bool = True, img_context_token_id: Optional[int] = None,
              publish_output: bool = True) -> ConvertResult:
    """HF folder -> torch_dist weights folder ``out`` (collective over ``tp x pp`` ranks, or one process).

    Written to :func:`staging_dir` and renamed to ``out`` when complete; ``publish_output=False``
    leaves the complete folder there (``--verify`` checks it first, then calls :func:`publish`).
    On any failure the staging folder is removed."""
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import Layout
    from v2pe_megatron.training import checkpointing as ckpt

    t0 = time.time()
    out = Path(out)
    plan = check_import(hf_dir, out, tp=tp, pp=pp, spec=spec, force=force, img_context_token_id=img_context_token_id)
    mc, layout, cfg, reader = plan.mc, plan.layout, plan.cfg, plan.reader
    table = weight_map(mc, layout)
    tmp = staging_dir(out)
    with _parallel(tp, pp):
        if _rank() == 0 and tmp.exists():
            shutil.rmtree(tmp)
        try:
            model = build_model(mc, Layout(tp=tp, pp=pp, spec=mc.spec), meta=True)  # no memory: shapes only
            used, problem, producer = set(), None, None
            try:
                producer = _Producer(model, mc, table, reader, tp, progress)
                used = producer.check()
            except HFCheckpointError as e:
                problem = str(e)
            _agree(problem)
            every = [used]
            if dist.get_world_size() > 1:
                every = [None] * dist.get_world_size()
                dist.all_gather_object(every, used)
            unused = sorted(set(reader.keys()) - set().union(*every))
            if unused:
                raise HFCheckpointError(f"unexpected HF tensor {unused[0]} ({len(unused)} unused in all); the config "
                                        f"does not describe this checkpoint")
            _save_streaming(tmp, model, producer)
            _check_all_written(producer)
            if _rank() == 0:
                mc_out = dataclasses.replace(mc, spec="auto")  # one set of names: the weights load into either spec
                write_model_yaml(tmp, mc_out, cfg)
                (tmp / SOURCE_CONFIG).write_text(json.dumps(cfg, indent=2))
            dist.barrier()
            ckpt.write_manifest(tmp)
            dist.barrier()
        except BaseException as e:
            if _rank() == 0:
                discard(tmp)
            everywhere = isinstance(e, HFCheckpointError) or getattr(e, "everywhere", False)
            if everywhere:
                # every rank has it (agreed, or gathered by megatron's save) and rank 0 says it: no
                # rank leaves before rank 0 (a rank that exits first has the others stopped)
                dist.barrier()
            if isinstance(e, OSError):
                raise _write_failed(e, tmp, out, plan.need_bytes, everywhere) from e
            raise
        if publish_output and _rank() == 0:
            publish(tmp, out)
        dist.barrier()
    reader.close()
    return ConvertResult(str(out if publish_output else tmp), time.time() - t0, len(reader.keys()), layout, tp, pp)


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
def _saved_name(name: str, layout: str) -> str:
    if layout == "native":
        for new, old in _NATIVE_SAVE:
            if name.startswith(new):
                return old + name[len(new):]
    return name


_NOT_TOKENIZER = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def tokenizer_files(src: str | os.PathLike) -> list[Path]:
    """The tokenizer (and processor, and remote code) files of ``src``: everything but weights and
    config.json. Raises when there are none."""
    s = Path(src)
    if not s.is_dir():
        raise FileNotFoundError(f"--tokenizer {s} is not a folder")
    files = [f for f in sorted(s.iterdir()) if f.is_file() and not f.name.endswith(_NOT_TOKENIZER)
             and f.name not in ("config.json", "model.safetensors.index.json")]
    if not files:
        raise HFCheckpointError(f"--tokenizer {s} holds no tokenizer files")
    return files


def check_tokenizer(src: str | os.PathLike, mc: ModelConfig, layout: str, model_yaml: Path) -> None:
    """The tokenizer an export copies must be this model's: the image tokens it lists have the model's
    ids, and the remote-code layout's lists ``<IMG_CONTEXT>`` (InternVL's chat code and ``import-hf``
    look it up there). So the exported folder loads, and imports back."""
    from v2pe_megatron.convert.hf_config import TOKEN_FILES, special_token_ids

    tokenizer_files(src)
    toks = special_token_ids(src)
    for name, want in (("<IMG_CONTEXT>", mc.img_context_token_id), ("<img>", mc.img_start_token_id),
                       ("</img>", mc.img_end_token_id)):
        if name in toks and toks[name] != want:
            raise HFCheckpointError(f"--tokenizer {src} gives {name} the id {toks[name]}, the model ({model_yaml}) "
                                    f"uses {want}: give the tokenizer the model was trained with")
    if layout == "remote" and "<IMG_CONTEXT>" not in toks:
        raise HFCheckpointError(f"--tokenizer {src} does not list the <IMG_CONTEXT> token (looked in "
                                f"{', '.join(TOKEN_FILES)}): the exported model could not find its image tokens; "
                                f"give the tokenizer folder of the model (e.g. the HF folder it was imported from)")


def copy_tokenizer(src: str | os.PathLike, dst: Path) -> list[str]:
    """Copies :func:`tokenizer_files` into ``dst``; returns their names."""
    files = tokenizer_files(src)
    for f in files:
        shutil.copy2(f, dst / f.name)
    return [f.name for f in files]


def _checkpoint_bytes(src: Path) -> int:
    """The model tensors' bytes in a torch_dist checkpoint (what an export writes), 0 if unreadable."""
    from megatron.core import dist_checkpointing

    try:
        meta = dist_checkpointing.load_tensors_metadata(str(src))
        return sum(math.prod(m.global_shape) * m.dtype.itemsize for k, m in meta.items()
                   if k.startswith(_MODEL_PREFIXES))
    except Exception:  # noqa: BLE001 - only for a message
        return 0


def export_hf(ckpt_path: str | os.PathLike, out: str | os.PathLike, *, layout: str = "remote-code",
              model_yaml: Optional[str | os.PathLike] = None, tokenizer: Optional[str | os.PathLike] = None,
              v2pe_delta: Optional[float] = None, force: bool = False, max_shard_bytes: int = 2 << 30,
              progress: bool = True, publish_output: bool = True) -> ConvertResult:
    """torch_dist checkpoint (weights folder, ``iter_*`` or a training ``checkpoint.dir``) -> HF folder.

    Written to :func:`staging_dir` and renamed to ``out`` when complete; ``publish_output=False``
    leaves the complete folder there (``--verify`` checks it first, then calls :func:`publish`).
    On any failure the staging folder is removed. ``tokenizer``: the folder whose tokenizer files
    (and remote code) complete the HF folder (:func:`check_tokenizer`); the CLI requires it."""
    from v2pe_megatron.convert.hf_config import v2pe_stride
    from v2pe_megatron.training import checkpointing as ckpt

    t0 = time.time()
    if layout not in LAYOUTS:
        raise HFCheckpointError(f"--layout {layout!r}: choose remote-code or transformers")
    lay = LAYOUTS[layout]
    if v2pe_delta is not None:
        v2pe_stride(v2pe_delta)  # a bad delta fails before anything is read
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise FileNotFoundError(f"--tokenizer {tokenizer} is not a folder")
    out = Path(out)
    check_out(out, force, {"--ckpt": ckpt_path, "--model-yaml": model_yaml, "--tokenizer": tokenizer})
    src = ckpt.checkpoint_folder(ckpt_path)  # verified; a damaged latest falls back as a resume does
    my = Path(model_yaml) if model_yaml else find_model_yaml(ckpt_path)
    if my is None:
        raise HFCheckpointError(f"no {MODEL_YAML} in or above {ckpt_path}: pass --model-yaml with the recipe "
                                f"(or its model section) the checkpoint was trained with")
    mc = read_model_yaml(my)
    ckpt.check_model_matches(src, mc, what=f"--ckpt {ckpt_path}", mine=f"--model-yaml {my}")
    if tokenizer is not None:
        check_tokenizer(tokenizer, mc, lay, my)
    source_cfg = None
    for c in (src, Path(ckpt_path), my.parent):
        if (c / SOURCE_CONFIG).is_file():
            source_cfg = json.loads((c / SOURCE_CONFIG).read_text())
            break
    if source_cfg is None and v2pe_delta is None:
        v2pe = _recipe_v2pe(my)
        if v2pe is not None:
            v2pe_delta = v2pe
    table = weight_map(mc, lay)
    tmp = staging_dir(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        notes = _export_into(tmp, src, mc, table, lay, source_cfg, v2pe_delta, tokenizer, max_shard_bytes, progress)
    except BaseException as e:
        discard(tmp)  # nothing half-written stays behind
        if isinstance(e, OSError):
            raise _write_failed(e, tmp, out, _checkpoint_bytes(src)) from e
        raise
    if publish_output:
        publish(tmp, out)
    return ConvertResult(str(out if publish_output else tmp), time.time() - t0, sum(len(mp.hf) for mp in table),
                         lay, notes=notes)


_LAYER = re.compile(r"^(.*\.decoder\.layers)\.(\d+)\.(.*)$")
_MODEL_PREFIXES = ("vision_model.", "projector.", "language_model.")


def _checkpoint_key(mcore: str) -> tuple[str, Optional[int]]:
    """A parameter's key in a torch_dist checkpoint, and its layer: megatron stores each kind of layer
    tensor once, stacked over the layers (``decoder.layers.mlp.linear_fc1.weight`` [layers, ...])."""
    m = _LAYER.match(mcore)
    return (f"{m.group(1)}.{m.group(3)}", int(m.group(2))) if m else (mcore, None)


def _load_key(src: Path, key: str, meta: dict) -> torch.Tensor:
    """One checkpoint tensor, whole (for layer tensors: all layers, stacked). torch's distributed
    checkpoint reads a slice only as one of a complete set of shards, so a layer cannot be read alone."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    sh = meta[key]
    request = {key: ShardedTensor.from_rank_offsets(key, torch.empty(tuple(sh.global_shape), dtype=sh.dtype),
                                                    replica_id=0)}
    return dist_checkpointing.load(request, str(src))[key]


def _export_into(tmp: Path, src: Path, mc: ModelConfig, table: list[Mapping], lay: str, source_cfg: Optional[dict],
                 v2pe_delta: Optional[float], tokenizer, max_shard_bytes: int, progress: bool) -> list[str]:
    """Streams: one checkpoint tensor at a time (a layer tensor holds every layer), never the model."""
    from megatron.core import dist_checkpointing
    from tqdm import tqdm

    from v2pe_megatron.convert.load import _ensure_single_rank

    meta = dist_checkpointing.load_tensors_metadata(str(src))
    # where the checkpoint keeps each tensor (checkpoints from before the unified names: the local ones)
    stored = {key: stored_name(key, meta) for key in (_checkpoint_key(mp.mcore)[0] for mp in table)}
    absent = sorted(key for key, at in stored.items() if at not in meta)
    if absent:
        raise HFCheckpointError(f"megatron tensor {absent[0]} is not in {src}")
    wanted = set(stored.values())
    unused = sorted(k for k in meta if k.startswith(_MODEL_PREFIXES) and k not in wanted)
    if unused:
        raise HFCheckpointError(f"checkpoint tensor {unused[0]} has no HF tensor in the table (is the model yaml "
                                f"the one this checkpoint was trained with?)")
    groups: dict[str, list[Mapping]] = {}
    for mp in table:  # one group per checkpoint tensor, in order of first use
        groups.setdefault(stored[_checkpoint_key(mp.mcore)[0]], []).append(mp)
    writer = ShardWriter(tmp, max_shard_bytes)
    with contextlib.ExitStack() as st:
        _ensure_single_rank(st)
        for key, group in tqdm(list(groups.items()), desc="export", unit="tensor", disable=not progress):
            whole = _load_key(src, key, meta)
            for mp in group:
                layer = _checkpoint_key(mp.mcore)[1]
                t = whole if layer is None else whole[layer]
                if mp.mcore in _VOCAB_PARAMS:
                    t = t[: mc.language.vocab_size]  # padding rows are not part of the HF model
                for name, x in zip(mp.hf, mp.to_hf(t)):
                    bad = nonfinite(x)
                    if bad:
                        where = key if layer is None else f"{key} (layer {layer})"
                        raise HFCheckpointError(f"checkpoint tensor {where} in {src} holds {bad} (HF tensor "
                                                f"{name}): the weights are not finite; export an earlier "
                                                f"checkpoint (an iter_* folder)")
                    writer.add(_saved_name(name, lay), x.clone())
            del whole
    writer.close()
    cfg = hf_config_from_model(mc, lay, source=source_cfg, v2pe_delta=v2pe_delta)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    notes = []
    if tokenizer is not None:
        notes.append(f"tokenizer files: {', '.join(copy_tokenizer(tokenizer, tmp))}")
    return notes


def _recipe_v2pe(path: Path) -> Optional[float]:
    """A fixed-delta recipe's delta (a training run's recipe says how its model reads positions)."""
    from v2pe_megatron.config import load_recipe

    v = load_recipe(path).v2pe
    return v.delta if v.policy == "fixed" else None
