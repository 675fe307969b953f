"""A CPU stand-in for the few Transformer Engine (TE) classes megatron-core's TE wrappers subclass.

``with fake_te.installed(): ...`` puts a package named ``transformer_engine`` into ``sys.modules``
and imports a fresh copy of ``megatron.core.extensions.transformer_engine`` on top of it, so
megatron's *real* wrappers (``TELayerNormColumnParallelLinear``, ``TERowParallelLinear``,
``TENorm``, ``TEDotProductAttention``) and the project's real ``te_layer_spec`` run unchanged on a
machine without TE or CUDA. On exit everything is put back as it was (modules already built keep
working: they hold their classes).

What the fake computes is plain torch (norms in float32 as TE's kernels do; attention with
:func:`v2pe_megatron.model.ring_attention.ring_attention`, which does context parallelism as TE's
``p2p`` ring does). What matters more is what it *asserts*: TE's contract, written from TE's source
at the tags cited (``NVIDIA/TransformerEngine``; ``v2.8`` is commit 40c69e75, ``v2.11`` c188b533,
``v2.16``/``v2.18`` as tagged; HEAD at the time was 2.20.0.dev0, d0067d0d). A CPU test that uses it
fails where a GPU with TE would:

Parameters and checkpoint names (``module/linear.py``, ``module/layernorm_linear.py``,
``ops/basic/layer_norm.py`` / ``rmsnorm.py`` at v2.8; unchanged at HEAD):
  - ``Linear``: ``weight`` [out/tp, in] (column) or [out, in/tp] (row), ``bias``; no bias means a
    plain empty tensor attribute, not a parameter. ``LayerNormLinear``: ``layer_norm_weight``,
    ``layer_norm_bias`` (LayerNorm only; ``None`` for RMSNorm), ``weight``, ``bias``. ``LayerNorm`` /
    ``RMSNorm``: ``weight`` (+ ``bias``). Every module has an ``_extra_state`` (FP8 metadata;
    ``module/base.py`` ``get_extra_state``: an empty uint8 tensor without FP8; the ops' version
    pickles an empty dict).
  - ``DotProductAttention`` registers a load-state-dict post hook that drops a missing
    ``core_attention._extra_state`` from the missing keys (``dot_product_attention.py`` __init__,
    ``remove_extra_states_check``), so a checkpoint without it loads strictly.

Device and initialization (``module/base.py`` ``reset_parameters`` at v2.8 and HEAD;
``layernorm_linear.py`` ``__init__``: ``self.reset_parameters(defer_init=device == "meta")``):
  - parameters are allocated with ``torch.empty(..., device=device)``; with ``device="meta"``
    initialization is deferred; with any other device ``reset_parameters`` runs *now* and
    materializes a meta parameter with ``torch.empty_like(param, device="cuda")`` before the init
    function runs (under the RNG tracker's ``fork()``). Only this non-deferred path tags the weights
    tensor-parallel (``set_tensor_model_parallel_attributes``) and the norm weights
    ``sequence_parallel``. megatron passes ``device=torch.cuda.current_device()`` unless
    ``config.init_model_with_meta_device`` (``_get_extra_te_kwargs``).
  - norm ops (``ops/basic/layer_norm.py``): ``canonicalize_device(None)`` is CUDA; a meta weight is
    re-made with ``torch.empty_like(weight, device=device)`` in ``reset_parameters``.

Attention backends (``attention/dot_product_attention/utils.py`` ``get_attention_backend`` and
``dot_product_attention.py`` ``forward``), see :func:`attention_backends`:
  - flash and fused attention need bf16/fp16 q/k/v ("Filter: Data type"); unfused takes fp32 too;
  - unfused is disabled for ``qkv_format=thd`` before v2.11 ("Filter: QKV layout", removed in
    v2.11), for thd with padding between sub-samples from v2.16 on, and with context parallelism
    always ("Filter: Context parallelism");
  - no backend left: ``ValueError("No dot product attention backend is available ...")``;
  - ``pad_between_seqs`` when not given: before v2.18 ``not torch.equal(cu_seqlens_q_padded[:-1],
    cu_seqlens_q[:-1])`` (or kv); from v2.18 on any padded cu_seqlens that are not the very objects
    of the unpadded ones.

thd inputs (``dot_product_attention.py`` forward at v2.8, "checks for qkv_format"; and
``context_parallel.py`` ``attn_forward_func_with_cp``): q/k/v 3-D [t, heads, dim]; a ``padding``
mask type (megatron's wrapper turns ``causal`` into ``padding_causal`` for thd); ``cu_seqlens_q``
and ``cu_seqlens_kv`` given, 1-D, int32, of equal shape; with CP > 1 the padded cu_seqlens are
required. Checked here beyond TE's asserts, because TE's kernels read them so on the GPU:
cu_seqlens on q's device, ``max_seqlen`` a Python int (TE computes a missing one with ``.item()``,
a host sync per layer), and the padded total equal to the whole pack (``t * cp``).

Not modelled (they raise ``NotImplementedError`` when asked for): FP8, userbuffer overlap,
``fuse_wgrad_accumulation``, ``parameters_split``, delayed weight gradients, attention dropout,
sliding windows, attention bias, KV caches, CP communication types other than ``p2p``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import pickle
import sys
import types
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

# The oldest release the project supports (pyproject's `gpu` extra): the strictest rules.
DEFAULT_VERSION = "2.8.0"

_EXTENSION = "megatron.core.extensions.transformer_engine"
_ACTIVE: dict = {}  # the installed version, read by the classes below


def _version() -> tuple[int, int]:
    v = _ACTIVE.get("version", DEFAULT_VERSION).split(".")
    return int(v[0]), int(v[1])


def _not_modelled(what: str):
    raise NotImplementedError(f"the fake Transformer Engine (v2pe_megatron.testing.fake_te) does not model {what}")


# ------------------------------------------------------------------------------------------------
# the attention backend rules
# ------------------------------------------------------------------------------------------------
def attention_backends(*, dtype: torch.dtype, qkv_format: str, context_parallel: bool,
                       pad_between_seqs: bool = False, version: Optional[tuple[int, int]] = None) -> set[str]:
    """The backends TE's ``get_attention_backend`` leaves for these inputs (on an sm80+ GPU with
    flash-attn installed; architecture and cuDNN filters are not modelled).

    Sources, ``attention/dot_product_attention/utils.py``: "Filter: Data type" (flash and fused need
    bf16/fp16; v2.8..HEAD), "Filter: QKV layout" (unfused off for thd before v2.11; off for thd with
    ``pad_between_seqs`` from v2.16; flash off for thd with ``pad_between_seqs``), "Filter: Context
    parallelism" (unfused off with CP; v2.8..HEAD).
    """
    version = version or _version()
    left = {"flash", "fused", "unfused"}
    if dtype not in (torch.bfloat16, torch.float16):
        left -= {"flash", "fused"}
    if qkv_format == "thd":
        if version < (2, 11):
            left.discard("unfused")
        if pad_between_seqs:
            left.discard("flash")
            if version >= (2, 16):
                left.discard("unfused")
    if context_parallel:
        left.discard("unfused")
    return left


NO_BACKEND = ("No dot product attention backend is available for the provided inputs. Please run with "
              "NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 to find out the reasons for disabling all backends.")


def _pad_between_seqs(cu_q, cu_kv, cu_q_padded, cu_kv_padded, version: tuple[int, int]) -> bool:
    """TE's default for ``pad_between_seqs`` in thd (``dot_product_attention.py`` forward)."""
    if version >= (2, 18):
        if cu_q_padded is cu_q and cu_kv_padded is cu_kv:
            return False
        return cu_q_padded is not None or cu_kv_padded is not None
    return bool((cu_q_padded is not None and not torch.equal(cu_q_padded[:-1], cu_q[:-1]))
                or (cu_kv_padded is not None and not torch.equal(cu_kv_padded[:-1], cu_kv[:-1])))


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _ParameterInitMeta:
    init_fn: Optional[Callable] = None
    get_rng_state_tracker: Optional[Callable] = None
    fp8_meta_index: Optional[int] = None


def _init_constant(value: float) -> Callable:
    return lambda t: torch.nn.init.constant_(t, value)


def _tp_size(tp_group, tp_size: int) -> int:
    return tp_size if tp_group is None else torch.distributed.get_world_size(tp_group)


class TransformerEngineBaseModule(torch.nn.Module):
    """``module/base.py``: parameters registered with their init function; ``reset_parameters``."""

    def __init__(self) -> None:
        super().__init__()
        self.param_init_meta: dict[str, _ParameterInitMeta] = {}
        self.fp8_meta = {"fp8_checkpoint": False}
        self.primary_weights_in_fp8 = False
        self.tp_group = None
        self.tp_group_initialized = False

    def register_parameter(self, name, param, **kwargs) -> None:
        super().register_parameter(name, param)
        self.param_init_meta[name] = _ParameterInitMeta(**kwargs)

    def set_tensor_parallel_group(self, tp_group) -> None:
        self.tp_group = tp_group
        self.tp_group_initialized = True

    def reset_parameters(self, defer_init: Optional[bool] = False) -> None:
        if defer_init:
            return
        for name, param in self.named_parameters(recurse=False):
            if param.device == torch.device("meta"):  # TE: "Ensure parameter is on a real device"
                param = torch.empty_like(param, device="cuda")
            meta = self.param_init_meta[name]
            if meta.get_rng_state_tracker is None:
                meta.init_fn(param)
            else:
                name_ = getattr(self, "rng_tracker_name", None)
                with meta.get_rng_state_tracker().fork(*((name_,) if name_ else ())):
                    meta.init_fn(param)
            setattr(self, name, torch.nn.Parameter(param))

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)  # no FP8: TE saves an empty byte tensor

    def set_extra_state(self, state) -> None:
        if state is None or (isinstance(state, torch.Tensor) and state.numel() == 0):
            return
        _not_modelled("FP8 extra state")


def _check_unmodelled(**flags) -> None:
    for name, value in flags.items():
        if value:
            _not_modelled(name)


class _GemmBase(TransformerEngineBaseModule):
    """What ``Linear`` and ``LayerNormLinear`` share: the weight and bias layout and the TP collectives."""

    def _setup(self, *, in_features, out_features, sequence_parallel, tp_group, tp_size, parallel_mode,
               bias, return_bias, params_dtype, device, init_method, get_rng_state_tracker) -> None:
        assert parallel_mode in (None, "column", "row"), f"parallel_mode {parallel_mode} not supported"
        self.in_features, self.out_features = in_features, out_features
        self.use_bias, self.return_bias = bias, return_bias
        self.apply_bias = bias and not return_bias
        self.tp_size = _tp_size(tp_group, tp_size)
        if tp_group is not None or tp_size == 1:
            self.set_tensor_parallel_group(tp_group)
        self.parallel_mode = parallel_mode
        if parallel_mode == "column":
            self.out_features //= self.tp_size
        elif parallel_mode == "row":
            self.in_features //= self.tp_size
        self.sequence_parallel = self.tp_size > 1 and sequence_parallel
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.weight_names, self.bias_names = ["weight"], ["bias"]
        weight = torch.empty(self.out_features, self.in_features, device=device, dtype=self.params_dtype)
        self.register_parameter("weight", torch.nn.Parameter(weight), init_fn=init_method,
                                get_rng_state_tracker=get_rng_state_tracker)
        if bias:
            b = torch.empty(self.out_features, device=device, dtype=self.params_dtype)
            self.register_parameter("bias", torch.nn.Parameter(b), init_fn=_init_constant(0.0))
        else:
            self.bias = torch.Tensor().to(dtype=self.params_dtype, device=device)

    def _tag_parallel(self) -> None:
        """``Linear.reset_parameters`` (not deferred): megatron's tensor-parallel attributes."""
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        set_tensor_model_parallel_attributes(self.weight, True, 1 if self.parallel_mode == "row" else 0, 1)
        if self.use_bias:
            if self.parallel_mode == "row":
                setattr(self.bias, "sequence_parallel", self.sequence_parallel)
            elif self.parallel_mode == "column":
                set_tensor_model_parallel_attributes(self.bias, True, 0, 1)

    def _gemm(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from megatron.core.tensor_parallel import mappings

        if self.parallel_mode == "column" and self.tp_size > 1:
            x = (mappings.gather_from_sequence_parallel_region(x, group=self.tp_group) if self.sequence_parallel
                 else mappings.copy_to_tensor_model_parallel_region(x, group=self.tp_group))
        fused_bias = self.bias if self.apply_bias and self.parallel_mode != "row" else None
        out = F.linear(x, self.weight, fused_bias)
        if self.parallel_mode == "row" and self.tp_size > 1:
            out = (mappings.reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
                   if self.sequence_parallel else mappings.reduce_from_tensor_model_parallel_region(out, self.tp_group))
        if self.apply_bias and self.parallel_mode == "row":
            out = out + self.bias  # TE adds a row-parallel bias after the reduction
        return (out, self.bias) if self.return_bias else out


class Linear(_GemmBase):
    """``transformer_engine.pytorch.Linear`` (``module/linear.py``)."""

    def __init__(self, in_features: int, out_features: int, sequence_parallel: bool = False,
                 fuse_wgrad_accumulation: bool = False, tp_group=None, tp_size: int = 1,
                 get_rng_state_tracker: Optional[Callable] = None, rng_tracker_name: Optional[str] = None,
                 init_method: Optional[Callable] = None, bias: bool = True, return_bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, parallel_mode: Optional[str] = None,
                 parameters_split=None, device="cuda", ub_overlap_ag: bool = False, ub_overlap_rs: bool = False,
                 ub_overlap_rs_dgrad: bool = False, ub_bulk_dgrad: bool = False, ub_bulk_wgrad: bool = False,
                 ub_name: Optional[str] = None, delay_wgrad_compute: bool = False, symmetric_ar_type=None,
                 save_original_input: bool = False, name: Optional[str] = None) -> None:
        super().__init__()
        _check_unmodelled(fuse_wgrad_accumulation=fuse_wgrad_accumulation, parameters_split=parameters_split,
                          userbuffers=ub_overlap_ag or ub_overlap_rs or ub_overlap_rs_dgrad or ub_bulk_dgrad
                          or ub_bulk_wgrad, delay_wgrad_compute=delay_wgrad_compute,
                          symmetric_ar_type=symmetric_ar_type)
        self.rng_tracker_name = rng_tracker_name
        self.save_original_input = save_original_input
        self.name = name
        self._setup(in_features=in_features, out_features=out_features, sequence_parallel=sequence_parallel,
                    tp_group=tp_group, tp_size=tp_size, parallel_mode=parallel_mode, bias=bias,
                    return_bias=return_bias, params_dtype=params_dtype, device=device, init_method=init_method,
                    get_rng_state_tracker=get_rng_state_tracker)
        self.reset_parameters(defer_init=device == "meta")

    def reset_parameters(self, defer_init=False) -> None:
        super().reset_parameters(defer_init=defer_init)
        if not defer_init:
            self._tag_parallel()

    def forward(self, inp: torch.Tensor, is_first_microbatch: Optional[bool] = None, fp8_output: bool = False,
                fp8_grad: bool = False):
        _check_unmodelled(fp8_output=fp8_output, fp8_grad=fp8_grad)
        return self._gemm(inp)


def _normalize(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
               normalization: str, zero_centered_gamma: bool) -> torch.Tensor:
    """TE's norm kernels compute in float32 and return the input dtype."""
    xf = x.float()
    w = weight.float() + 1 if zero_centered_gamma else weight.float()
    if normalization == "LayerNorm":
        y = F.layer_norm(xf, (xf.shape[-1],), w, None if bias is None else bias.float(), eps)
    else:
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w
    return y.to(x.dtype)


class LayerNormLinear(_GemmBase):
    """``transformer_engine.pytorch.LayerNormLinear`` (``module/layernorm_linear.py``): the norm
    before the GEMM lives in this module as ``layer_norm_weight`` / ``layer_norm_bias``."""

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-5, sequence_parallel: bool = False,
                 fuse_wgrad_accumulation: bool = False, tp_group=None, tp_size: int = 1,
                 get_rng_state_tracker: Optional[Callable] = None, init_method: Optional[Callable] = None,
                 bias: bool = True, normalization: str = "LayerNorm", return_bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, parallel_mode: Optional[str] = None,
                 return_layernorm_output: bool = False, return_layernorm_output_gathered: bool = False,
                 parameters_split=None, zero_centered_gamma: bool = False, device="cuda",
                 ub_overlap_ag: bool = False, ub_overlap_rs_dgrad: bool = False, ub_bulk_wgrad: bool = False,
                 ub_bulk_dgrad: bool = False, ub_name: Optional[str] = None, delay_wgrad_compute: bool = False,
                 symmetric_ar_type=None, name: Optional[str] = None) -> None:
        super().__init__()
        assert normalization in ("LayerNorm", "RMSNorm"), "Unsupported normalization type!"
        _check_unmodelled(fuse_wgrad_accumulation=fuse_wgrad_accumulation, parameters_split=parameters_split,
                          return_layernorm_output=return_layernorm_output,
                          userbuffers=ub_overlap_ag or ub_overlap_rs_dgrad or ub_bulk_wgrad or ub_bulk_dgrad,
                          delay_wgrad_compute=delay_wgrad_compute, symmetric_ar_type=symmetric_ar_type)
        self.normalization, self.eps, self.zero_centered_gamma = normalization, eps, zero_centered_gamma
        self.name = name
        dtype = params_dtype or torch.get_default_dtype()
        tp = _tp_size(tp_group, tp_size)
        local_in = in_features // tp if parallel_mode == "row" else in_features
        lnw = torch.nn.Parameter(torch.empty(local_in, device=device, dtype=dtype))
        self.register_parameter("layer_norm_weight", lnw, init_fn=_init_constant(float(not zero_centered_gamma)))
        if normalization != "RMSNorm":
            lnb = torch.nn.Parameter(torch.empty(local_in, device=device, dtype=dtype))
            self.register_parameter("layer_norm_bias", lnb, init_fn=_init_constant(0.0))
        else:
            self.layer_norm_bias = None
        self._setup(in_features=in_features, out_features=out_features, sequence_parallel=sequence_parallel,
                    tp_group=tp_group, tp_size=tp_size, parallel_mode=parallel_mode, bias=bias,
                    return_bias=return_bias, params_dtype=dtype, device=device, init_method=init_method,
                    get_rng_state_tracker=get_rng_state_tracker)
        self.reset_parameters(defer_init=device == "meta")

    def reset_parameters(self, defer_init=False) -> None:
        super().reset_parameters(defer_init=defer_init)
        if not defer_init:
            self._tag_parallel()
            setattr(self.layer_norm_weight, "sequence_parallel", self.sequence_parallel)
            if self.layer_norm_bias is not None:
                setattr(self.layer_norm_bias, "sequence_parallel", self.sequence_parallel)

    def forward(self, inp: torch.Tensor, is_first_microbatch: Optional[bool] = None, fp8_output: bool = False,
                fp8_grad: bool = False):
        _check_unmodelled(fp8_output=fp8_output, fp8_grad=fp8_grad)
        x = _normalize(inp, self.layer_norm_weight, self.layer_norm_bias, self.eps, self.normalization,
                       self.zero_centered_gamma)
        return self._gemm(x)


class _NormOp(torch.nn.Module):
    """``ops/basic/layer_norm.py`` / ``rmsnorm.py`` behind ``transformer_engine.pytorch.LayerNorm`` /
    ``RMSNorm`` (``module/layernorm.py``, ``module/rmsnorm.py``)."""

    normalization = "LayerNorm"

    def __init__(self, normalized_shape=None, eps: float = 1e-5, sequence_parallel: Optional[bool] = None,
                 params_dtype: Optional[torch.dtype] = None, zero_centered_gamma: bool = False,
                 hidden_size: Optional[int] = None, device=None, dtype: Optional[torch.dtype] = None,
                 sm_margin=0) -> None:
        super().__init__()
        shape = normalized_shape if normalized_shape is not None else hidden_size
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        dtype = dtype or params_dtype or torch.get_default_dtype()
        self.eps, self.zero_centered_gamma, self.sequence_parallel = eps, zero_centered_gamma, sequence_parallel
        device = torch.device("cuda") if device is None else torch.device(device) if not isinstance(device, int) \
            else torch.device("cuda", device)  # canonicalize_device: None is the current CUDA device
        self.weight = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        if self.normalization == "LayerNorm":
            self.bias = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        else:
            self.bias = None
        if device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        params = {"weight": self.weight} | ({"bias": self.bias} if self.bias is not None else {})
        for name, p in params.items():
            if p.device.type == "meta":
                p = torch.empty_like(p, device="cuda")
            if name == "weight":
                torch.nn.init.constant_(p, 0.0 if self.zero_centered_gamma else 1.0)
            else:
                torch.nn.init.zeros_(p)
            p = p if isinstance(p, torch.nn.Parameter) else torch.nn.Parameter(p)
            if self.sequence_parallel is not None:
                p.sequence_parallel = self.sequence_parallel
            setattr(self, name, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _normalize(x, self.weight, self.bias, self.eps, self.normalization, self.zero_centered_gamma)

    def get_extra_state(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(pickle.dumps({})), dtype=torch.uint8)  # no FP8 recipe state

    def set_extra_state(self, state) -> None:
        if state is None or state.numel() == 0 or not pickle.loads(state.detach().numpy().tobytes()):
            return
        _not_modelled("FP8 extra state")


class LayerNorm(_NormOp):
    normalization = "LayerNorm"


class RMSNorm(_NormOp):
    normalization = "RMSNorm"


class DotProductAttention(TransformerEngineBaseModule):
    """``transformer_engine.pytorch.DotProductAttention`` (``attention/dot_product_attention/``)."""

    calls: dict[str, int] = {}  # forward calls per qkv_format that met the contract (tests read it)

    def __init__(self, num_attention_heads: int, kv_channels, num_gqa_groups: Optional[int] = None,
                 attention_dropout: float = 0.0, qkv_format: str = "sbhd", attn_mask_type: str = "causal",
                 window_size=None, sequence_parallel: bool = False, tp_size: int = 1,
                 get_rng_state_tracker: Optional[Callable] = None, tp_group=None, layer_number: Optional[int] = None,
                 attention_type: str = "self", cp_group=None, cp_global_ranks=None, cp_stream=None,
                 cp_comm_type: str = "p2p", softmax_scale: Optional[float] = None, softmax_type: str = "vanilla",
                 return_max_logit: bool = False) -> None:
        super().__init__()
        _check_unmodelled(attention_dropout=attention_dropout, sliding_window=window_size is not None,
                          softmax_type=softmax_type != "vanilla", return_max_logit=return_max_logit,
                          cross_attention=attention_type != "self")
        self.te_version = _version()  # the release this module stands for, also after installed() ends
        self.fp32_attention = _ACTIVE.get("fp32_attention", False)
        self.qkv_format = qkv_format
        attn_mask_type = attn_mask_type.replace(",", "_")
        self.attn_mask_type = "padding_causal" if attn_mask_type == "causal_padding" else attn_mask_type
        self.tp_size = _tp_size(tp_group, tp_size)
        self.set_tensor_parallel_group(tp_group)
        self.num_attention_heads = num_attention_heads
        self.layer_number = 1 if layer_number is None else layer_number
        self.set_context_parallel_group(cp_group, cp_global_ranks, cp_stream, cp_comm_type)
        self.hidden_size_per_attention_head_k = kv_channels if isinstance(kv_channels, int) else kv_channels[0]
        self.hidden_size_per_attention_head_v = kv_channels if isinstance(kv_channels, int) else kv_channels[1]
        self.num_gqa_groups = num_attention_heads if num_gqa_groups is None else num_gqa_groups
        self.num_gqa_groups_per_partition = self.num_gqa_groups // self.tp_size
        assert num_attention_heads % self.num_gqa_groups == 0, \
            "The number of attention heads must be divisible by the number of GQA groups!"
        self.softmax_scale = (1.0 / math.sqrt(self.hidden_size_per_attention_head_k) if softmax_scale is None
                              else softmax_scale)

        def remove_extra_states_check(module, incompatible_keys):
            for key in list(incompatible_keys.missing_keys):
                if "core_attention._extra_state" in key:
                    incompatible_keys.missing_keys.remove(key)

        self.register_load_state_dict_post_hook(remove_extra_states_check)

    def set_context_parallel_group(self, cp_group, cp_global_ranks, cp_stream, cp_comm_type: str = "p2p") -> None:
        self.cp_group, self.cp_global_ranks, self.cp_stream, self.cp_comm_type = (cp_group, cp_global_ranks,
                                                                                   cp_stream, cp_comm_type)

    def forward(self, query_layer, key_layer, value_layer, attention_mask=None, qkv_format: Optional[str] = None,
                cu_seqlens_q=None, cu_seqlens_kv=None, cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None,
                max_seqlen_q=None, max_seqlen_kv=None, attn_mask_type: Optional[str] = None, window_size=None,
                checkpoint_core_attention: bool = False, core_attention_bias_type: str = "no_bias",
                core_attention_bias=None, alibi_slopes=None, fast_zero_fill: bool = True, inference_params=None,
                pad_between_seqs: Optional[bool] = None, fp8_output: bool = False, num_splits=None):
        from megatron.core.packed_seq_params import PackedSeqParams

        from v2pe_megatron.model.ring_attention import ring_attention

        _check_unmodelled(sliding_window=window_size is not None, attention_bias=core_attention_bias_type != "no_bias"
                          or alibi_slopes is not None, kv_cache=inference_params is not None, fp8_output=fp8_output)
        q, k, v = query_layer, key_layer, value_layer
        assert q.dtype == k.dtype == v.dtype, "Queries, keys and values must have the same data type!"
        assert k.shape[:-1] == v.shape[:-1], \
            "Keys and values must have the same batch size, sequence length and number of heads!"
        assert q.shape[-1] == self.hidden_size_per_attention_head_k and v.shape[-1] == \
            self.hidden_size_per_attention_head_v, "q/k/v head dimensions differ from kv_channels"
        assert k.shape[-2] == self.num_gqa_groups_per_partition, \
            f"Keys and values must have num_gqa_group = {self.num_gqa_groups_per_partition} heads! Found {k.shape[-2]}."
        mask = self.attn_mask_type if attn_mask_type is None else attn_mask_type.replace(",", "_")
        mask = "padding_causal" if mask == "causal_padding" else mask
        fmt = self.qkv_format if qkv_format is None else qkv_format
        assert fmt in ("sbhd", "bshd", "thd"), "DotProductAttention only supports qkv_format = {'sbhd', 'bshd', 'thd'}!"
        cp = torch.distributed.get_world_size(self.cp_group) if self.cp_group is not None else 1
        if cp > 1 and self.cp_comm_type != "p2p":
            _not_modelled(f"cp_comm_type={self.cp_comm_type}")
        if fmt == "thd":
            self._check_thd(q, k, v, mask, cp, cu_seqlens_q, cu_seqlens_kv, cu_seqlens_q_padded,
                            cu_seqlens_kv_padded, max_seqlen_q, max_seqlen_kv)
            if pad_between_seqs is None:
                pad_between_seqs = _pad_between_seqs(cu_seqlens_q, cu_seqlens_kv, cu_seqlens_q_padded,
                                                     cu_seqlens_kv_padded, self.te_version)
        else:
            assert all(t.dim() == 4 for t in (q, k, v)), f"Queries, keys and values must be 4D tensors when {fmt=}!"
            if "padding" in mask:
                _not_modelled("padding masks in sbhd/bshd (an attention_mask)")
            pad_between_seqs = False
        if not attention_backends(dtype=q.dtype, qkv_format=fmt, context_parallel=cp > 1,
                                  pad_between_seqs=bool(pad_between_seqs), version=self.te_version):
            if not (self.fp32_attention and q.dtype == torch.float32):
                raise ValueError(NO_BACKEND)
        causal = mask in ("causal", "padding_causal")
        group = self.cp_group if cp > 1 else None
        DotProductAttention.calls[fmt] = DotProductAttention.calls.get(fmt, 0) + 1
        if fmt == "thd" and group is None:
            return self._thd_local(q, k, v, causal, cu_seqlens_q, cu_seqlens_q_padded)
        if fmt == "thd":
            psp = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv,
                                  cu_seqlens_q_padded=cu_seqlens_q_padded, cu_seqlens_kv_padded=cu_seqlens_kv_padded,
                                  max_seqlen_q=max_seqlen_q, max_seqlen_kv=max_seqlen_kv)
            out = ring_attention(q[:, None], k[:, None], v[:, None], causal=causal, softmax_scale=self.softmax_scale,
                                 packed_seq_params=psp, cp_group=group)
            return out[:, 0]  # [t, heads * dim]
        if fmt == "bshd":
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        if group is not None:
            out = ring_attention(q, k, v, causal=causal, softmax_scale=self.softmax_scale, cp_group=group)
        else:  # [s, b, h, d] -> [b, h, s, d], GQA groups repeated
            rep = q.shape[2] // k.shape[2]
            qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))
            kb, vb = kb.repeat_interleave(rep, dim=1), vb.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=causal, scale=self.softmax_scale)
            out = out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)
        return out.transpose(0, 1).contiguous() if fmt == "bshd" else out

    def _thd_local(self, q, k, v, causal: bool, cu, cu_padded) -> torch.Tensor:
        """thd without CP: each sub-sample on its own; keys past its unpadded length are masked and
        its padding rows come out zero (TE zero-fills them)."""
        padded = (cu_padded if cu_padded is not None else cu).tolist()
        real = cu.tolist()
        rep = q.shape[1] // k.shape[1]
        out = q.new_zeros(q.shape[0], q.shape[1] * q.shape[2])
        for i in range(len(padded) - 1):
            a, n = padded[i], real[i + 1] - real[i]
            if n <= 0:
                continue
            qs, ks, vs = (t[a:a + n].transpose(0, 1) for t in (q, k, v))  # [h, n, d]
            ks, vs = ks.repeat_interleave(rep, dim=0), vs.repeat_interleave(rep, dim=0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=self.softmax_scale)
            out[a:a + n] = o.transpose(0, 1).reshape(n, -1)
        return out

    @staticmethod
    def _check_thd(q, k, v, mask, cp, cu_q, cu_kv, cu_q_padded, cu_kv_padded, max_q, max_kv) -> None:
        assert all(t.dim() == 3 for t in (q, k, v)), "Queries, keys and values must be 3D tensors when qkv_format = thd!"
        assert "padding" in mask, "Attention mask type must be padding or padding_causal for qkv_format=thd!"
        assert cu_q is not None and cu_kv is not None, \
            "cu_seqlens_q and cu_seqlens_kv can not be None when qkv_format = thd!"
        assert torch.is_tensor(cu_q) and torch.is_tensor(cu_kv) and cu_q.shape == cu_kv.shape and cu_q.dim() == 1, \
            "cu_seqlens_q and cu_seqlens_q must both have shape [batch_size + 1]!"
        assert cu_q.dtype == torch.int32 and cu_kv.dtype == torch.int32, \
            "cu_seqlens_q and cu_seqlens_q must both be in dtype torch.int32!"
        if cp > 1:
            assert cu_q_padded is not None and cu_kv_padded is not None, \
                "cu_seqlens_padded can not be None for context parallelism and qkv_format = 'thd'!"
        for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_kv", cu_kv), ("cu_seqlens_q_padded", cu_q_padded),
                         ("cu_seqlens_kv_padded", cu_kv_padded)):
            if cu is not None:
                assert torch.is_tensor(cu) and cu.dim() == 1 and cu.dtype == torch.int32, \
                    f"{name} must be one 1-D int32 tensor in thd"
                assert cu.device == q.device, f"{name} is on {cu.device}, q on {q.device}"
        padded = cu_q_padded if cu_q_padded is not None else cu_q
        assert q.shape[0] * cp == int(padded[-1]), \
            f"q holds {q.shape[0]} tokens x cp {cp} but cu_seqlens end at {int(padded[-1])}"
        for name, m in (("max_seqlen_q", max_q), ("max_seqlen_kv", max_kv)):
            assert isinstance(m, int), f"{name} must be a Python int (TE would sync the host to compute it)"


# ------------------------------------------------------------------------------------------------
# what megatron's extension module touches at import time and never calls on our path
# ------------------------------------------------------------------------------------------------
def _unmodelled_class(name: str) -> type:
    def __init__(self, *args, **kwargs):
        _not_modelled(name)

    return type(name.rsplit(".", 1)[-1], (), {"__init__": __init__, "__module__": "transformer_engine.fake"})


def _unmodelled_function(name: str) -> Callable:
    def fn(*args, **kwargs):
        _not_modelled(name)

    fn.__name__ = name.rsplit(".", 1)[-1]
    return fn


class FP8GlobalStateManager:
    """``pytorch/fp8.py`` (``quantization.py`` in later releases): FP8 is never on here."""

    @staticmethod
    def is_fp8_enabled() -> bool:
        return False

    @staticmethod
    def with_fp8_parameters() -> bool:
        return False

    @staticmethod
    def fp8_graph_capturing() -> bool:
        return False


@contextlib.contextmanager
def fp8_autocast(enabled: bool = True, **_kwargs):
    if enabled:
        _not_modelled("fp8_autocast(enabled=True)")
    yield


@contextlib.contextmanager
def fp8_model_init(enabled: bool = True, **_kwargs):
    if enabled:
        _not_modelled("fp8_model_init(enabled=True)")
    yield


def _package(version: str) -> dict[str, types.ModuleType]:
    def module(name: str, **attrs) -> types.ModuleType:
        m = types.ModuleType(name, f"fake Transformer Engine ({__name__})")
        m.__dict__.update(attrs)
        return m

    fp8 = module("transformer_engine.pytorch.fp8", FP8GlobalStateManager=FP8GlobalStateManager,
                 fp8_autocast=fp8_autocast, fp8_model_init=fp8_model_init)
    router = module("transformer_engine.pytorch.router", **{n: _unmodelled_function(n) for n in (
        "fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_topk_with_score_function")})
    distributed = module("transformer_engine.pytorch.distributed",
                         CudaRNGStatesTracker=_unmodelled_class("CudaRNGStatesTracker"))
    recipe = module("transformer_engine.common.recipe", DelayedScaling=_unmodelled_class("DelayedScaling"))
    common = module("transformer_engine.common", recipe=recipe)
    pytorch = module("transformer_engine.pytorch", Linear=Linear, LayerNormLinear=LayerNormLinear,
                     LayerNorm=LayerNorm, RMSNorm=RMSNorm, DotProductAttention=DotProductAttention,
                     GroupedLinear=_unmodelled_class("GroupedLinear"), fp8=fp8, router=router,
                     distributed=distributed, ops=module("transformer_engine.pytorch.ops"))
    top = module("transformer_engine", __version__=version, pytorch=pytorch, common=common)
    mods = [top, pytorch, fp8, router, distributed, common, recipe, pytorch.ops]
    # A package path makes `import transformer_engine.pytorch.X` of anything else an ImportError
    # (what megatron's optional imports expect), not an AttributeError.
    for m in mods:
        m.__path__ = []
    return {m.__name__: m for m in mods}


@contextlib.contextmanager
def installed(version: str = DEFAULT_VERSION, *, fp32_attention: bool = False) -> Iterator[types.ModuleType]:
    """Make ``transformer_engine`` the fake (reporting ``version``) and re-import megatron's TE
    extension on it; yields that extension module. Everything is restored on exit.

    ``fp32_attention``: attention in fp32 also where TE has no backend for it (thd before 2.11, any
    CP), for parity tests that compare a TE-spec layout with an fp32 one-rank reference at a tight
    tolerance. Every other check stays; that TE refuses fp32 there is tested without it
    (tests/model/test_fake_te.py), and ``Layout.problems`` refuses such recipes before launch."""
    import megatron.core.extensions as extensions
    import megatron.core.utils as mutils

    if "transformer_engine" in sys.modules and not _ACTIVE:
        raise RuntimeError("a real transformer_engine is imported in this process; the fake would shadow it")
    saved = {k: v for k, v in sys.modules.items() if k == _EXTENSION or k == "transformer_engine"
             or k.startswith("transformer_engine.")}
    saved_attr = getattr(extensions, "transformer_engine", None)
    saved_version, saved_active = mutils._te_version, dict(_ACTIVE)
    try:
        for k in saved:
            del sys.modules[k]
        sys.modules.update(_package(version))
        mutils._te_version = None  # megatron caches the version it read first
        _ACTIVE.update(version=version, fp32_attention=fp32_attention)
        yield importlib.import_module(_EXTENSION)
    finally:
        for k in [k for k in sys.modules if k == _EXTENSION or k == "transformer_engine"
                  or k.startswith("transformer_engine.")]:
            del sys.modules[k]
        sys.modules.update(saved)
        if saved_attr is not None:
            extensions.transformer_engine = saved_attr
        elif hasattr(extensions, "transformer_engine"):
            del extensions.transformer_engine
        mutils._te_version = saved_version
        _ACTIVE.clear()
        _ACTIVE.update(saved_active)
