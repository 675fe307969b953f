"""Layer specs for two worlds: Transformer Engine modules on GPU, local modules + our attention on CPU.

The choice is made once from the recipe (``model.spec``: auto | te | local) and the machine
(``parallel.layout.resolve_spec``), and carried by the ``Layout``. The local spec is what CI
exercises; it runs every TP x PP x CP x DP layout on gloo. Module names differ between the two (TE
fuses the pre-norms into ``linear_qkv.layer_norm_weight`` and ``linear_fc1.layer_norm_weight``);
checkpoint names do not: the local spec saves its norms under TE's names
(``model.checkpoint_names``), so a checkpoint loads into either spec.
"""

from __future__ import annotations

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from v2pe_megatron.model.attention import SDPACoreAttention, with_v2pe_rotary
from v2pe_megatron.model.checkpoint_names import LOCAL_TO_TE
from v2pe_megatron.parallel.layout import LayoutError, cp_comm_type_problem


class TorchNorm:
    """LayerNorm/RMSNorm from torch that also works under sequence parallelism.

    megatron's ``WrappedTorchNorm`` refuses sequence parallelism; the only thing SP needs from a norm
    is that its weight gradients are summed over the TP group, which megatron's
    ``finalize_model_grads`` does for every parameter tagged ``sequence_parallel``.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        for p in norm.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)
        return norm


def local_layer_spec(*, core_attention: type, mask_type: AttnMaskType = AttnMaskType.causal,
                     qk_norm: bool = False) -> ModuleSpec:
    """Pre-norm transformer layer from megatron-core's local modules and a given core attention."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=TorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=TorchNorm if qk_norm else IdentityOp,
                    k_layernorm=TorchNorm if qk_norm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=TorchNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            # the pre-norms under Transformer Engine's names: one checkpoint format for both specs
            sharded_state_dict_keys_map=dict(LOCAL_TO_TE),
        ),
    )


def te_layer_spec(*, mask_type: AttnMaskType = AttnMaskType.causal, qk_norm: bool = False) -> ModuleSpec:
    """Transformer Engine layer: fused layernorm-linear for qkv and fc1, TE attention (with CP)."""
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TELayerNormColumnParallelLinear,
                    core_attention=TEDotProductAttention,
                    linear_proj=TERowParallelLinear,
                    q_layernorm=TENorm if qk_norm else IdentityOp,
                    k_layernorm=TENorm if qk_norm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear,
                                                                linear_fc2=TERowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def layer_spec(spec: str, *, mask_type: AttnMaskType = AttnMaskType.causal, qk_norm: bool = False,
               core_attention: type | None = None, rotary: bool = False) -> ModuleSpec:
    """The layer spec for ``spec`` (already resolved: te | local). ``rotary``: the core attention
    applies V2PE's rotary embedding first (``model.attention.V2PERotary``; the LLM's layers)."""
    if spec == "te":
        out = te_layer_spec(mask_type=mask_type, qk_norm=qk_norm)
    else:
        out = local_layer_spec(core_attention=core_attention or SDPACoreAttention, mask_type=mask_type,
                               qk_norm=qk_norm)
    if rotary:
        attn = out.submodules.self_attention.submodules
        attn.core_attention = with_v2pe_rotary(attn.core_attention)
    return out


def check_context_parallel(spec: str, config: TransformerConfig, layer: ModuleSpec) -> None:
    """Fail at model build, before any step, when the layer's attention cannot do this config's CP.

    TE's attention does CP itself (p2p, a2a, a2a+p2p, all_gather); a local core attention must
    declare ``supports_context_parallel`` (ours: p2p ring attention). megatron's local
    ``DotProductAttention`` asserts cp == 1 deep inside its constructor instead.
    """
    if config.context_parallel_size <= 1:
        return
    core = layer.submodules.self_attention.submodules.core_attention
    core_cls = core.module if isinstance(core, ModuleSpec) else core
    name = getattr(core_cls, "__name__", repr(core_cls))
    if spec == "te":
        if not name.startswith("TE"):
            raise ValueError(f"model.spec=te with context parallelism needs TEDotProductAttention, got {name}")
        return
    if not getattr(core_cls, "supports_context_parallel", False):
        raise ValueError(f"parallel.cp={config.context_parallel_size}: the core attention {name} has no context "
                         f"parallelism; use the default local attention (SDPACoreAttention, ring attention), "
                         f"model.spec=te, or parallel.cp=1")
    problem = cp_comm_type_problem(config.cp_comm_type or "p2p", "local", config.context_parallel_size)
    if problem:
        raise LayoutError(problem)


def block_spec(spec: str, config: TransformerConfig, layer: ModuleSpec, vp_stage: int | None = None):
    """Block submodules for this pipeline stage: the layer spec repeated, and a final norm that
    matches the spec (megatron's default for a bare layer spec is a norm that rejects SP on CPU)."""
    from megatron.core import parallel_state as ps

    check_context_parallel(spec, config, layer)
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    pp_rank = ps.get_pipeline_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if spec == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        norm = TENorm
    else:
        norm = TorchNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=norm)
