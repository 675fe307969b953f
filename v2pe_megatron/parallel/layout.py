"""The parallel layout: one frozen object, built once, that every part of the project asks.

A :class:`Layout` holds the sizes (tp, pp, cp, dp, sequence parallel), the attention implementation
(``spec``: Transformer Engine or local) and what follows from them: the multiple every packed
sub-sample is padded to (:attr:`Layout.seq_multiple`), how packed micro-batches are fed to attention
(:attr:`Layout.qkv_format`), the shape megatron's pipeline schedule must be told
(:meth:`Layout.schedule_shape`). Every rule about layouts lives here once, with the message that
says what to change: recipe validation, the packer, the CP split, the layer specs and the attention
modules all call into this module instead of re-stating a rule.

No torch process group is needed: a layout is plain data, so it is checked before any process starts.
The rules are explained in ``docs/parallelism.md``.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # config imports this module; the types are only for readers
    from v2pe_megatron.config import ModelConfig, ParallelConfig

__all__ = ["Layout", "LayoutError", "CP_COMM_TYPES", "SPECS", "TE_THD_CP_SUPPORT", "TE_VERSION_RANGE",
           "TE_FP32_THD", "seq_multiple", "check_multiple", "param_gather_overlaps", "cp_comm_type_problem",
           "te_dtype_problem", "te_version", "have_transformer_engine", "resolve_spec"]


class LayoutError(ValueError):
    """A layout that cannot run; the message says which key to change."""


CP_COMM_TYPES = ("p2p", "a2a", "a2a+p2p", "all_gather")
SPECS = ("auto", "te", "local")

# Transformer Engine's attention with packed sequences in its ``thd`` format (the only format the TE
# spec feeds it, see Layout.qkv_format): the first TE release that accepts each context-parallel
# communication type, or None when no release does. TE raises deep inside the first forward
# otherwise ("... does not support THD format"), after the whole model has been built and loaded.
TE_THD_CP_SUPPORT: dict[str, Optional[tuple[int, int]]] = {
    "p2p": (0, 0),
    "a2a": (2, 10),
    "all_gather": (2, 18),
    "a2a+p2p": None,
}
# The Transformer Engine releases this table (and pyproject's `gpu` extra, and constraints.txt)
# covers: [first, last]. 2.9 is the first with a CUDA 13 core library (transformer-engine-cu13),
# which the CUDA 13 torch of constraints.txt needs.
TE_VERSION_RANGE: tuple[tuple[int, int], tuple[int, int]] = ((2, 9), (2, 20))

# Transformer Engine's attention in fp32 (``get_attention_backend`` in
# ``transformer_engine/pytorch/attention/dot_product_attention/utils.py``, v2.8 to 2.20.0.dev0): its
# flash and fused backends take bf16/fp16 only ("Filter: Data type"); the unfused one takes fp32,
# but not packed thd sequences before this release ("Filter: QKV layout": v2.10 still disables it,
# v2.11 no longer does), never with context parallelism ("Filter: Context parallelism"), and from
# v2.16 not for thd with padding between sub-samples (which the packer never passes: its cu_seqlens
# are the padded ones). No backend left: "No dot product attention backend is available" at the
# first forward.
TE_FP32_THD: tuple[int, int] = (2, 11)


def te_version() -> Optional[tuple[int, int]]:
    """(major, minor) of the installed Transformer Engine, or None."""
    for dist_name in ("transformer-engine", "transformer_engine", "transformer-engine-torch"):
        try:
            parts = importlib.metadata.version(dist_name).split(".")
        except importlib.metadata.PackageNotFoundError:
            continue
        try:
            return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
        except (IndexError, ValueError):
            return None
    return None


def have_transformer_engine() -> bool:
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except Exception:  # noqa: BLE001 - a broken TE install counts as absent
        return False
    return bool(HAVE_TE)


AUTO_FP32_NOTE = ("model.spec=auto runs the local spec (torch attention) because model.dtype=fp32: Transformer "
                  "Engine's fast attention needs bf16 or fp16. Set model.dtype=bf16 to train with Transformer Engine.")
_said: set[str] = set()


def _say_once(message: str) -> None:
    """A warning, once per process, on rank 0 only (every rank resolves the spec)."""
    import logging

    import torch.distributed as dist

    if message in _said or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return
    _said.add(message)
    logging.getLogger(__name__).warning(message)


def resolve_spec(requested: str, dtype: Optional[str] = None) -> str:
    """``auto`` -> ``te`` with CUDA and Transformer Engine, else ``local``; ``te`` demands both.

    ``dtype`` (``model.dtype``): ``auto`` with ``fp32`` is ``local`` also where TE is present, saying
    so once (:data:`AUTO_FP32_NOTE`): TE's attention has no fast fp32 backend and, before 2.11 or
    with CP, none at all for the TE spec's packed sequences (:data:`TE_FP32_THD`). ``te`` with fp32
    where TE cannot run it is refused by :meth:`Layout.problems` (``model=``), before launch.
    """
    import torch

    if requested not in SPECS:
        raise LayoutError(f"model.spec={requested!r} is not one of {', '.join(SPECS)}")
    te_ok = torch.cuda.is_available() and have_transformer_engine()
    if requested == "auto":
        if te_ok and dtype == "fp32":
            _say_once(AUTO_FP32_NOTE)
            return "local"
        return "te" if te_ok else "local"
    if requested == "te" and not te_ok:
        raise LayoutError("model.spec=te needs CUDA and transformer-engine (pip install '.[gpu]'); "
                          "use model.spec=auto or local")
    return requested


def te_dtype_problem(dtype: str, cp: int, te: Optional[tuple[int, int]] = None) -> Optional[str]:
    """Why Transformer Engine's attention cannot run the TE spec's packed (thd) batches in ``dtype``
    at this CP size with TE ``te`` (the installed version, when known), or None. See
    :data:`TE_FP32_THD` for the rules and where they come from."""
    if dtype != "fp32":
        return None
    fix = "set model.dtype=bf16 (Transformer Engine's flash and fused attention), or model.spec=local"
    if cp > 1:
        return (f"model.spec=te with model.dtype=fp32 and parallel.cp={cp}: Transformer Engine has no fp32 "
                f"attention with context parallelism (flash and fused attention need bf16/fp16, the unfused one "
                f"has no CP); {fix}")
    if te is not None and te < TE_FP32_THD:
        return (f"model.spec=te with model.dtype=fp32: Transformer Engine {te[0]}.{te[1]} has no fp32 attention "
                f"for the packed (thd) sequences the TE spec feeds it (flash and fused attention need bf16/fp16, "
                f"the unfused one takes thd from {TE_FP32_THD[0]}.{TE_FP32_THD[1]} on); {fix}, or upgrade "
                f"transformer-engine")
    return None


def seq_multiple(cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """What every packed sub-sample's length must be a multiple of: context parallelism cuts each
    sub-sample into 2*cp zigzag chunks (cp > 1), and sequence parallelism splits the sequence over
    tp ranks."""
    m = 2 * cp if cp > 1 else 1
    return m * tp if sequence_parallel else m


def _multiple_what(cp: int, tp: int, sequence_parallel: bool) -> str:
    parts = (["2*cp"] if cp > 1 else []) + (["tp (sequence parallel)"] if sequence_parallel else [])
    return "*".join(parts) or "1"


def param_gather_overlaps(distributed_optimizer: bool, overlap_grad_reduce: bool, overlap_param_gather: bool) -> bool:
    """Whether the parameters' all-gather runs during the next forward: only the distributed optimizer
    gathers, and megatron gathers per gradient bucket, which exist only with overlapped reduction."""
    return distributed_optimizer and overlap_grad_reduce and overlap_param_gather


def check_multiple(lengths: Sequence[int], multiple: int, what: str = "sub-sample") -> None:
    """Raise LayoutError naming the first length that is not a multiple of ``multiple``."""
    for i, n in enumerate(lengths):
        if int(n) % multiple:
            raise LayoutError(f"{what} {i} has padded length {int(n)}, which is not a multiple of {multiple} "
                              f"(the layout's seq_multiple); the packer must pad every sub-sample to a "
                              f"multiple of {multiple}")


def cp_comm_type_problem(cp_comm_type: str, spec: str, cp: int,
                         te: Optional[tuple[int, int]] = None) -> Optional[str]:
    """Why ``cp_comm_type`` cannot run with this attention implementation, or None.

    ``spec`` is ``local`` (our p2p ring attention only), ``te`` (Transformer Engine in thd: see
    :data:`TE_THD_CP_SUPPORT`, checked against ``te``, the installed version, when known) or
    ``auto`` (not resolved yet: nothing can be said). Only matters when cp > 1.
    """
    if cp <= 1 or cp_comm_type not in CP_COMM_TYPES:
        return None
    if spec == "local" and cp_comm_type != "p2p":
        return (f"parallel.cp_comm_type={cp_comm_type} needs Transformer Engine; the local spec does context "
                f"parallelism with its p2p ring attention only: set parallel.cp_comm_type=p2p, or model.spec=te "
                f"on a GPU with transformer-engine")
    if spec == "te":
        first = TE_THD_CP_SUPPORT[cp_comm_type]
        if first is None:
            return (f"parallel.cp_comm_type={cp_comm_type} is not supported by any Transformer Engine release "
                    f"with packed (thd) sequences, which the TE spec always uses: use cp_comm_type=p2p, or a2a "
                    f"(TE >= {'.'.join(map(str, TE_THD_CP_SUPPORT['a2a']))})")
        if te is not None and te < first:
            return (f"parallel.cp_comm_type={cp_comm_type} with packed (thd) sequences needs Transformer Engine "
                    f">= {first[0]}.{first[1]}, installed is {te[0]}.{te[1]}: upgrade transformer-engine or use "
                    f"cp_comm_type=p2p")
    return None


@dataclass(frozen=True)
class Layout:
    """How the ranks of a job are arranged, and what that implies. Frozen: built once, then asked.

    ``dp=-1`` means "not known yet" (a recipe checked without a world size); ``spec`` is ``te``,
    ``local`` or, before it is resolved on the machine that runs it, ``auto``.
    """

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sp: bool = False
    spec: str = "local"
    cp_comm_type: str = "p2p"
    hierarchical_cp_sizes: tuple[int, ...] = ()
    pp_layers: tuple[int, ...] = ()
    distributed_optimizer: bool = False
    virtual_pp: int = 1
    # Data-parallel communication overlapped with compute (training.engine.wrap_ddp; the planner's
    # step time counts what stays exposed).
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    te: Optional[tuple[int, int]] = field(default=None, compare=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, par: "ParallelConfig", *, world_size: Optional[int] = None, spec: str = "auto",
                    te: Optional[tuple[int, int]] = None) -> "Layout":
        """The layout of ``par`` on ``world_size`` ranks (dp derived when ``par.dp`` is -1).

        Raises LayoutError when the world size does not fit; other problems are listed by
        :meth:`problems` so that validation can report them all at once.
        """
        dp = par.dp
        if world_size is not None:
            mp = par.tp * par.pp * par.cp
            if mp < 1 or world_size % mp:
                raise LayoutError(f"world size {world_size} is not divisible by tp*pp*cp = {par.tp}*{par.pp}*{par.cp} "
                                  f"= {mp}; launch a multiple of {mp} processes or change the layout")
            derived = world_size // mp
            if dp not in (-1, derived):
                raise LayoutError(f"parallel.dp={dp} but world size {world_size} / (tp*pp*cp) = {derived}; set "
                                  f"parallel.dp=-1 or launch {dp * mp} processes")
            dp = derived
        if te is None and spec == "te":
            te = te_version()
        return cls(tp=par.tp, pp=par.pp, cp=par.cp, dp=dp, sp=par.sequence_parallel, spec=spec,
                   cp_comm_type=par.cp_comm_type, hierarchical_cp_sizes=tuple(par.hierarchical_cp_sizes),
                   pp_layers=tuple(par.pp_layers), distributed_optimizer=par.use_distributed_optimizer, te=te,
                   virtual_pp=getattr(par, "virtual_pp", 1), overlap_grad_reduce=par.overlap_grad_reduce,
                   overlap_param_gather=par.overlap_param_gather)

    def resolved(self, dtype: Optional[str] = None) -> "Layout":
        """This layout with ``spec`` resolved on this machine (``auto`` -> te | local) for a model
        in ``dtype`` (see :func:`resolve_spec`)."""
        import dataclasses

        spec = resolve_spec(self.spec, dtype)
        return dataclasses.replace(self, spec=spec, te=te_version() if spec == "te" else None)

    # ------------------------------------------------------------------ derived facts
    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * max(self.dp, 1)

    @property
    def param_gather_overlapped(self) -> bool:
        return param_gather_overlaps(self.distributed_optimizer, self.overlap_grad_reduce, self.overlap_param_gather)

    @property
    def seq_multiple(self) -> int:
        return seq_multiple(self.cp, self.tp, self.sp)

    @property
    def qkv_format(self) -> str:
        """How packed micro-batches reach attention: Transformer Engine honours cu_seqlens only in its
        packed ``thd`` format (rows flattened into one [1, B*S] pack); the local attention reads
        per-row cu_seqlens in ``sbhd``."""
        return "thd" if self.spec == "te" else "sbhd"

    def schedule_shape(self, seq_length: int, micro_batch_size: int) -> tuple[int, int]:
        """(seq_length, micro_batch_size) to give megatron's pipeline schedule, which sizes the
        tensors passed between stages as [seq_length / cp (/ tp with SP), micro_batch_size, hidden].

        The full, unsplit sequence length: the schedule divides by cp itself. In ``thd`` the rows of
        a micro-batch travel as one flat pack, so the stage boundary holds [B*S/cp, 1, h].
        """
        if self.qkv_format == "thd":
            return seq_length * micro_batch_size, 1
        return seq_length, micro_batch_size

    def describe(self) -> str:
        dp = self.dp if self.dp > 0 else "?"
        return (f"tp={self.tp} pp={self.pp}" + (f" vpp={self.virtual_pp}" if self.virtual_pp > 1 else "")
                + f" cp={self.cp} dp={dp}" + (" sp" if self.sp else ""))

    # ------------------------------------------------------------------ rules
    def problems(self, *, model: Optional["ModelConfig"] = None, seq_length: Optional[int] = None,
                 micro_batch_size: Optional[int] = None, global_batch_size: Optional[int] = None) -> list[str]:
        """Every reason this layout cannot run (with the given model and batch shapes), each with its fix."""
        errs: list[str] = []
        for key, val in (("parallel.tp", self.tp), ("parallel.pp", self.pp), ("parallel.cp", self.cp),
                         ("parallel.virtual_pp", self.virtual_pp)):
            if val < 1:
                errs.append(f"{key}={val} must be >= 1")
        if self.dp == 0 or self.dp < -1:
            errs.append(f"parallel.dp={self.dp} must be >= 1, or -1 to derive it from the world size")
        if errs:  # the rules below divide by these sizes
            return errs
        if self.spec not in SPECS:
            errs.append(f"model.spec={self.spec!r} is not one of {', '.join(SPECS)}")
        if self.cp_comm_type not in CP_COMM_TYPES:
            errs.append(f"parallel.cp_comm_type={self.cp_comm_type!r} is not one of {', '.join(CP_COMM_TYPES)}")

        if self.virtual_pp > 1 and self.pp == 1:
            errs.append(f"parallel.virtual_pp={self.virtual_pp} interleaves pipeline stages and needs parallel.pp > 1; "
                        f"set virtual_pp=1 or raise pp")
        if self.virtual_pp > 1 and self.pp_layers:
            errs.append("parallel.virtual_pp > 1 takes an even split of the layers; remove parallel.pp_layers")
        if self.sp and self.tp == 1:
            errs.append("parallel.sequence_parallel=true needs parallel.tp > 1; set sequence_parallel=false or raise tp")
        m = self.seq_multiple
        if seq_length is not None and seq_length % m:
            errs.append(f"data.seq_length={seq_length} must be divisible by "
                        f"{_multiple_what(self.cp, self.tp, self.sp)} = {m}; use e.g. seq_length="
                        f"{-(-seq_length // m) * m}")

        hs = self.hierarchical_cp_sizes
        if self.cp_comm_type == "a2a+p2p" and (len(hs) != 2 or hs[0] * hs[1] != self.cp):
            errs.append(f"parallel.cp_comm_type=a2a+p2p needs hierarchical_cp_sizes=[a2a, p2p] with product "
                        f"cp={self.cp}, got {list(hs)}")
        if hs and self.cp_comm_type != "a2a+p2p":
            errs.append(f"parallel.hierarchical_cp_sizes={list(hs)} is only used by cp_comm_type=a2a+p2p (got "
                        f"{self.cp_comm_type}); remove it or set cp_comm_type=a2a+p2p")
        comm = cp_comm_type_problem(self.cp_comm_type, self.spec, self.cp, self.te)
        if comm:
            errs.append(comm)

        if model is not None:
            errs += self._model_problems(model)
            if self.spec == "te":
                dtype = te_dtype_problem(model.dtype, self.cp, self.te)
                if dtype:
                    errs.append(dtype)
        if micro_batch_size is not None and global_batch_size is not None and self.dp > 0:
            if global_batch_size % (micro_batch_size * self.dp):
                errs.append(f"data.global_batch_size={global_batch_size} must be a multiple of micro_batch_size*dp "
                            f"= {micro_batch_size}*{self.dp}")
            elif self.virtual_pp > 1 and (global_batch_size // (micro_batch_size * self.dp)) % self.pp:
                # megatron's interleaved schedule runs micro-batches in groups of pp per model chunk
                per_step, group = global_batch_size // (micro_batch_size * self.dp), micro_batch_size * self.dp * self.pp
                errs.append(f"parallel.virtual_pp={self.virtual_pp} needs the micro-batches per step "
                            f"(global_batch_size / (micro_batch_size*dp) = {per_step}) to be a multiple of "
                            f"parallel.pp={self.pp}; use data.global_batch_size={group * -(-global_batch_size // group)}")
        return errs

    def _model_problems(self, model: "ModelConfig") -> list[str]:
        errs: list[str] = []
        lm, vit = model.language, model.vision
        for key, val in (("model.language.num_attention_heads", lm.num_attention_heads),
                         ("model.language.num_query_groups", lm.num_query_groups),
                         ("model.vision.num_attention_heads", vit.num_attention_heads),
                         ("model.language.ffn_hidden_size", lm.ffn_hidden_size),
                         ("model.vision.ffn_hidden_size", vit.ffn_hidden_size)):
            if val % self.tp:
                errs.append(f"parallel.tp={self.tp} must divide {key}={val}; use a tp that divides it")
        a2a = self.cp if self.cp_comm_type == "a2a" else (
            self.hierarchical_cp_sizes[0] if self.cp_comm_type == "a2a+p2p" and self.hierarchical_cp_sizes else 1)
        if a2a > 1 and (lm.num_query_groups < a2a * self.tp or lm.num_query_groups % (a2a * self.tp)):
            errs.append(f"all-to-all context parallelism of degree {a2a} x tp {self.tp} exceeds or does not divide "
                        f"the {lm.num_query_groups} KV heads; use cp_comm_type=p2p or a smaller a2a degree")
        if self.pp_layers:
            if len(self.pp_layers) != self.pp:
                errs.append(f"parallel.pp_layers has {len(self.pp_layers)} entries but parallel.pp={self.pp}")
            elif sum(self.pp_layers) != lm.num_layers or min(self.pp_layers) < 1:
                errs.append(f"parallel.pp_layers={list(self.pp_layers)} must be positive and sum to "
                            f"model.language.num_layers={lm.num_layers}")
        elif self.virtual_pp > 1 and lm.num_layers % (self.pp * self.virtual_pp):
            errs.append(f"parallel.pp*virtual_pp = {self.pp}*{self.virtual_pp} must divide "
                        f"model.language.num_layers={lm.num_layers} (one equal model chunk per virtual stage)")
        elif lm.num_layers % self.pp:
            errs.append(f"parallel.pp={self.pp} must divide model.language.num_layers={lm.num_layers}, or give an "
                        f"unequal split with parallel.pp_layers")
        if self.pp > 1 and lm.tie_word_embeddings:
            errs.append("model.language.tie_word_embeddings=true is not supported with parallel.pp > 1 (the embedding "
                        "and output layer live on different stages); use pp=1")
        return errs

    def check(self, **shapes: Any) -> "Layout":
        """Raise LayoutError listing :meth:`problems`; return self otherwise."""
        errs = self.problems(**shapes)
        if errs:
            raise LayoutError("invalid parallel layout:\n  - " + "\n  - ".join(errs))
        return self
