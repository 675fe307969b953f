"""The language model (InternLM2 / Qwen2 / Llama shapes) composed from megatron-core parts.

Why not ``GPTModel``: it is deprecated in 0.19 and, like ``LLaVAModel`` on top of it, derives rotary
positions from the sequence index. V2PE needs per-token (fractional) positions, so this module takes
``position_ids`` (float64 [b, s]), turns them into rotary cos/sin once per micro-batch and hands them
to every layer's core attention with the packing metadata (``parallel.packed_seq.PackParams``;
applied by ``model.attention.V2PERotary``). Everything else is megatron's own: vocab-parallel
embedding and output layer, the block with its pipeline-stage slicing and recompute, vocab-parallel
cross entropy.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from v2pe_megatron.config import LanguageConfig
from v2pe_megatron.model.specs import block_spec, layer_spec
from v2pe_megatron.model.transformer_config import shared_kwargs
from v2pe_megatron.parallel.layout import Layout
from v2pe_megatron.parallel.packed_seq import PackParams


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocab rounded up to a multiple of tp (megatron's vocab-parallel layers split it evenly).
    Padded rows are extra logits past ``vocab_size``; ``InternVLModel.logits`` drops them."""
    return -(-vocab_size // tp) * tp


def language_transformer_config(lm: LanguageConfig, layout: Layout, *, dtype: str = "fp32",
                                recompute: str = "none", init_std: float = 0.02) -> TransformerConfig:
    """megatron ``TransformerConfig`` for the LLM from the model's language section and the layout."""
    kwargs = shared_kwargs(dtype=dtype, recompute=recompute, init_std=init_std)
    if layout.pp > 1 and layout.pp_layers:
        # Unequal stages: megatron's flexible layout (embedding on the first stage, loss on the last).
        stages = [["decoder"] * n for n in layout.pp_layers]
        stages[0].insert(0, "embedding")
        stages[-1].append("loss")
        kwargs.update(pipeline_model_parallel_layout=stages)
    if layout.virtual_pp > 1:
        kwargs.update(virtual_pipeline_model_parallel_size=layout.virtual_pp)
    if layout.cp > 1:
        # Read by Transformer Engine's attention (TEDotProductAttention) and checked by the local spec.
        kwargs.update(cp_comm_type=layout.cp_comm_type,
                      hierarchical_context_parallel_sizes=list(layout.hierarchical_cp_sizes) or None)
    return TransformerConfig(
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        num_attention_heads=lm.num_attention_heads,
        num_query_groups=lm.num_query_groups,
        ffn_hidden_size=lm.ffn_hidden_size,
        kv_channels=lm.hidden_size // lm.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=lm.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=lm.qkv_bias,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.sp,
        # Loss summed per token, divided by the global batch's trained tokens in finalize_model_grads.
        calculate_per_token_loss=True,
        **kwargs,
    )


class LanguageModel(LanguageModule):
    """Decoder-only LM with per-token rotary positions.

    forward(input_ids [b, s] or decoder_input [s, b, h], position_ids float64 [b, s]) returns
    logits [b, s, vocab/tp] (no labels) or the per-token loss [b, s] (labels given); on a
    non-last pipeline stage it returns the hidden states.
    """

    def __init__(self, config: TransformerConfig, layer_spec, *, vocab_size: int,
                 max_sequence_length: int, rotary_base: float, pre_process: bool = True,
                 post_process: bool = True, tie_word_embeddings: bool = False, vp_stage: Optional[int] = None,
                 loss_chunk_tokens: int = 0):
        if loss_chunk_tokens < 0:
            raise ValueError(f"loss_chunk_tokens must be >= 0 (0: one piece), got {loss_chunk_tokens}")
        super().__init__(config=config)
        self.loss_chunk_tokens = loss_chunk_tokens
        from v2pe_megatron.v2pe import V2PERotaryEmbedding

        self.model_type = ModelType.encoder_or_decoder
        self.pre_process = pre_process
        self.post_process = post_process
        self.vocab_size = vocab_size
        self.share_embeddings_and_output_weights = tie_word_embeddings
        if pre_process:
            # No scatter inside the embedding: image features are merged into the full sequence first
            # (see ``embed``), then the sequence-parallel scatter happens.
            self.embedding = LanguageModelEmbedding(config, vocab_size, max_sequence_length,
                                                    position_embedding_type="none",
                                                    scatter_to_sequence_parallel=False)
        self.rotary_pos_emb = V2PERotaryEmbedding(config.kv_channels, rotary_base)
        # layer_spec: a layer ModuleSpec or TransformerBlockSubmodules (see specs.block_spec)
        self.decoder = TransformerBlock(config=config, spec=layer_spec, pre_process=pre_process,
                                        post_process=post_process, vp_stage=vp_stage)
        from v2pe_megatron.model.attention import V2PERotary

        plain = [type(layer.self_attention.core_attention).__name__ for layer in self.decoder.layers
                 if not isinstance(layer.self_attention.core_attention, V2PERotary)]
        if plain:  # positions would be ignored without a word
            raise ValueError(f"the language model's layers must apply V2PE's rotary embedding in their core "
                             f"attention (specs.layer_spec(..., rotary=True)); got {plain[0]}")
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=False,
                skip_bias_add=False, gather_output=False,
                skip_weight_param_allocation=pre_process and tie_word_embeddings)
        if tie_word_embeddings:
            if not (pre_process and post_process):
                raise NotImplementedError("tied embeddings with pipeline parallelism are not supported")

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def embed(self, input_ids: Tensor, *, scatter: bool = True) -> Tensor:
        """Token embeddings [s, b, h]; with ``scatter`` (and SP on) scattered to this rank's sequence
        shard. ``scatter=False`` returns the full sequence so callers can edit it before ``scatter_sp``."""
        emb = self.embedding(input_ids=input_ids, position_ids=None)
        return self.scatter_sp(emb) if scatter else emb

    def scatter_sp(self, emb: Tensor) -> Tensor:
        """Full-sequence [s, b, h] -> this rank's sequence-parallel shard (identity without SP)."""
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb

    def forward(self, input_ids: Optional[Tensor], position_ids: Tensor, *, decoder_input: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, packed_seq_params: Optional[PackedSeqParams] = None,
                attention_mask: Optional[Tensor] = None) -> Tensor:
        if decoder_input is None and self.pre_process:
            decoder_input = self.embed(input_ids)
        hidden = self.decoder(hidden_states=decoder_input, attention_mask=attention_mask, rotary_pos_emb=None,
                              packed_seq_params=self.with_rotary(position_ids, packed_seq_params))
        if not self.post_process:
            return hidden
        weight = self.embedding.word_embeddings.weight if self.share_embeddings_and_output_weights else None
        rows = getattr(packed_seq_params, "loss_rows", None)
        if labels is not None and rows is not None and rows.numel() and not self.config.sequence_parallel:
            return self.trained_rows_loss(hidden, labels, weight, rows)
        if labels is not None and self.loss_chunk_tokens:
            return self.chunked_loss(hidden, labels, weight)
        logits, _ = self.output_layer(hidden, weight=weight)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)

    def with_rotary(self, position_ids: Tensor, packed_seq_params: Optional[PackedSeqParams]) -> PackParams:
        """``packed_seq_params`` (None: unpacked rows) carrying this micro-batch's rotary cos/sin in the
        compute dtype, for every layer's core attention. They cover the rank's whole (CP-local)
        sequence: under SP the attention still sees all of it."""
        rotary = self.rotary_pos_emb.cos_sin(position_ids, dtype=self.config.params_dtype)
        if isinstance(packed_seq_params, PackParams):
            return dataclasses.replace(packed_seq_params, rotary=rotary, memo=packed_seq_params.memo)
        base = {f.name: getattr(packed_seq_params, f.name) for f in dataclasses.fields(PackedSeqParams)} \
            if packed_seq_params is not None else {"qkv_format": "sbhd"}
        return PackParams(**base, rotary=rotary)

    def trained_rows_loss(self, hidden: Tensor, labels: Tensor, weight: Optional[Tensor], rows: Tensor) -> Tensor:
        """Per-token loss [b, s] with the output layer and cross entropy run on the trained ``rows``
        only (``PackParams.loss_rows``); the other tokens' loss is 0. The loss function multiplies
        those by a zero mask anyway, so the loss and every gradient are those of the full
        computation, without the [s, b, vocab/tp] logits of image and prompt tokens (most of a
        multimodal pack). Not under sequence parallelism: there the output layer gathers the
        sequence over TP, whose ranks hold different shards."""
        s, b = hidden.shape[:2]
        picked = hidden.reshape(s * b, 1, -1).index_select(0, rows)
        target = labels.t().reshape(1, s * b).index_select(1, rows)
        if self.loss_chunk_tokens:
            loss = self.chunked_loss(picked, target, weight)
        else:
            loss = self._chunk_loss(picked, target, weight)
        full = loss.new_zeros(s * b).index_copy(0, rows, loss.reshape(-1))
        return full.reshape(s, b).t().contiguous()

    def _chunk_loss(self, hidden: Tensor, labels: Tensor, weight: Optional[Tensor]) -> Tensor:
        logits, _ = self.output_layer(hidden, weight=weight)
        return self.compute_language_model_loss(labels, logits)

    def chunked_loss(self, hidden: Tensor, labels: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        """Per-token loss [b, s] computed ``loss_chunk_tokens`` logits rows at a time.

        Each chunk runs megatron's output layer and vocab-parallel cross entropy under activation
        checkpointing: its [chunk, b, vocab/tp] logits (and the softmax the cross entropy keeps) are
        dropped after the forward and recomputed, one chunk at a time, in the backward, so no
        [s, b, vocab/tp] tensor exists in either pass. Under sequence parallelism the output layer
        all-gathers the hidden states of its input over TP: each rank feeds the same slice of its own
        shard, the logits rows are the slice of every shard in rank order, and the labels and the
        loss are picked and placed to match.
        """
        s_local = hidden.shape[0]
        tp = self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1
        step = max(1, -(-self.loss_chunk_tokens // tp))
        if step >= s_local:
            return self._chunk_loss(hidden, labels, weight)
        losses = []
        for a in range(0, s_local, step):
            e = min(a + step, s_local)
            lab = torch.cat([labels[:, j * s_local + a:j * s_local + e] for j in range(tp)], dim=1)
            losses.append(checkpoint(self._chunk_loss, hidden[a:e], lab, weight, use_reentrant=False))
        # losses[k] holds, per TP shard j, the positions j*s_local + [a_k, e_k): back to sequence order.
        return torch.cat([c for j in range(tp) for c in (l.chunk(tp, dim=1)[j] for l in losses)], dim=1)


def build_language_model(lm: LanguageConfig, layout: Layout, *, dtype: str = "fp32", recompute: str = "none",
                         pre_process: bool = True, post_process: bool = True,
                         core_attention: type | None = None, vp_stage: Optional[int] = None,
                         loss_chunk_tokens: int = 0) -> LanguageModel:
    """The LLM for one pipeline stage (megatron's parallel state must be initialized).

    ``core_attention`` replaces the local spec's attention class (a stand-in with Transformer
    Engine's contract in tests); the layout's ``spec`` picks TE or local modules otherwise.
    ``loss_chunk_tokens``: see :meth:`LanguageModel.chunked_loss` (0: the loss in one piece).
    """
    cfg = language_transformer_config(lm, layout, dtype=dtype, recompute=recompute)
    spec = "local" if core_attention is not None else layout.spec
    layers = block_spec(spec, cfg, layer_spec(spec, core_attention=core_attention, rotary=True), vp_stage=vp_stage)
    return LanguageModel(cfg, layers, vocab_size=padded_vocab_size(lm.vocab_size, layout.tp),
                         max_sequence_length=lm.max_position_embeddings, rotary_base=lm.rotary_base,
                         pre_process=pre_process, post_process=post_process,
                         tie_word_embeddings=lm.tie_word_embeddings, vp_stage=vp_stage,
                         loss_chunk_tokens=loss_chunk_tokens)
