"""InternVL: InternViT + projector (HF's ``mlp1``) + LLM, composed from megatron-core parts.

Vision features replace the ``<IMG_CONTEXT>`` embeddings one for one, in row-major order of
``input_ids`` (the order of HF's ``masked_scatter``), before the sequence-parallel scatter. The
vision tower and projector live on the first pipeline stage only.

Forward contract (the training loop and context parallelism rely on it)::

    forward(input_ids [b, s], position_ids float64 [b, s], pixel_values [T, 3, H, W] | None, *,
            labels=None, packed_seq_params=None, image_feature_index=None, image_exchange=None,
            image_token_count=None)
      -> logits [b, s, V/tp] (no labels) | per-token loss [b, s] (labels) | hidden (non-last stage)

``image_feature_index`` (optional, long [n_ctx]) picks which rows of the flattened [T * n, H]
features go to this rank's ``<IMG_CONTEXT>`` tokens, for callers that hold only part of a sequence
(context parallelism) with every tile in ``pixel_values``. ``image_exchange`` (a
``parallel.cp_split.ImageExchange``, set by ``split_batch_for_cp``) is the context-parallel path:
``pixel_values`` holds only this rank's tile share (None when it is empty) and the features travel
by all-to-all to the ranks whose tokens take them (``model/vision_cp.py``). Without either, the
counts must match exactly. ``image_token_count`` (int, optional): the number of ``<IMG_CONTEXT>``
tokens in ``input_ids``, counted on the host by the caller (``MicroBatch.num_image_tokens``), so the
check needs no read-back from the device.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from v2pe_megatron.config import ModelConfig
from v2pe_megatron.model.language import build_language_model
from v2pe_megatron.model.projector import Projector
from v2pe_megatron.model.vision import InternViT, vision_transformer_config
from v2pe_megatron.model.vision_cp import cp_group_of, encode_images_cp, encode_images_exchange
from v2pe_megatron.parallel.layout import Layout

# The three parts a recipe can freeze, by the attribute that holds each.
PARTS = {"vision": "vision_model", "projector": "projector", "language": "language_model"}


class InternVLModel(MegatronModule):
    """Built by :func:`build_model`; ``layout`` is the parallel layout it was built for."""

    def __init__(self, model_cfg: ModelConfig, layout: Layout, *, recompute: str = "none",
                 pre_process: bool = True, post_process: bool = True, core_attention: type | None = None,
                 vp_stage: Optional[int] = None):
        # The wrapper shares the LLM's TransformerConfig object: DDP and the schedules read it from here.
        language_model = build_language_model(model_cfg.language, layout, dtype=model_cfg.dtype,
                                              recompute=recompute, pre_process=pre_process,
                                              post_process=post_process, core_attention=core_attention,
                                              vp_stage=vp_stage, loss_chunk_tokens=model_cfg.loss_chunk_tokens)
        super().__init__(config=language_model.config)
        self.language_model = language_model
        self.model_type = ModelType.encoder_or_decoder
        self.model_cfg = model_cfg
        self.layout = layout
        self.pre_process = pre_process
        self.post_process = post_process
        self.img_context_token_id = model_cfg.img_context_token_id
        self.vocab_size = model_cfg.language.vocab_size
        if pre_process:
            vision_config = vision_transformer_config(model_cfg.vision, layout, dtype=model_cfg.dtype,
                                                      recompute=recompute)
            # A core-attention stand-in (tests) runs on local modules; the vision tower follows.
            self.vision_model = InternViT(vision_config, model_cfg.vision,
                                          spec="local" if core_attention is not None else layout.spec)
            self.projector = Projector(vision_config, model_cfg.vision.hidden_size, model_cfg.language.hidden_size,
                                       downsample_ratio=model_cfg.projector.downsample_ratio,
                                       layernorm_eps=model_cfg.projector.layernorm_eps)

    def freeze(self, *, vision: bool = False, projector: bool = False, language: bool = False) -> list[str]:
        """Stop training the named parts (on the stages that hold them); returns the frozen parameter
        names. Call before wrapping in DDP: megatron's gradient buffers only cover trainable parameters."""
        frozen = []
        for part, on in (("vision", vision), ("projector", projector), ("language", language)):
            module = getattr(self, PARTS[part], None) if on else None
            for name, p in (module.named_parameters(prefix=PARTS[part]) if module is not None else ()):
                p.requires_grad_(False)
                frozen.append(name)
        return frozen

    def parameters_in_forward_order(self) -> list[torch.nn.Parameter]:
        """The parameters in the order the forward first reads them: the token embedding, the vision
        tower and the projector (``merge``), then the rest of the LLM. The engine issues the overlapped
        all-gathers of the distributed optimizer in this order (registered, the vision tower comes
        after the whole LLM: the first forward would wait for all of the LLM's parameters)."""
        first = [getattr(self.language_model, "embedding", None), getattr(self, "vision_model", None),
                 getattr(self, "projector", None), self]
        return list({id(p): p for m in first if m is not None for p in m.parameters()}.values())

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    # finalize_model_grads looks these up on the outer module to sync tied embeddings across stages.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """[T, 3, H, W] -> [T, n, H_llm] (n = num_image_token for the configured image size)."""
        return self.projector(self.vision_model(pixel_values))

    def _vision_params_zero(self) -> Tensor:
        # Text-only micro-batches: every vision/projector parameter still joins the graph with a zero
        # weight, so gradient hooks fire and data-parallel reductions see the same parameter set.
        params = [p for m in (self.vision_model, self.projector) for p in m.parameters() if p.requires_grad]
        if not params:
            return None
        return sum(p.sum() for p in params) * 0.0

    def merge(self, input_ids: Tensor, pixel_values: Optional[Tensor],
              image_feature_index: Optional[Tensor] = None, image_exchange=None,
              image_token_count: Optional[int] = None) -> Tensor:
        """Full-sequence embeddings [s, b, h] with the image features in place of <IMG_CONTEXT>.
        ``image_token_count``: the <IMG_CONTEXT> tokens of ``input_ids`` when the caller counted them
        on the host (the training batch does); else they are counted here, a read-back from the
        device."""
        emb = self.language_model.embed(input_ids, scatter=False)         # [s, b, h]
        ctx = input_ids == self.img_context_token_id                      # [b, s]
        n_ctx = int(ctx.sum()) if image_token_count is None else image_token_count
        if image_exchange is not None and image_exchange.tokens_per_tile:
            # Context parallelism: this rank holds its tile share only; the features come by all-to-all
            # (every CP rank of a micro-batch with images joins it, whatever its share).
            share = pixel_values if pixel_values is not None else emb.new_zeros((0,))
            start, stop = image_exchange.tile_range
            # Only a rank with no tile to encode needs the vision parameters tied in by hand.
            zero = self._vision_params_zero() if torch.is_grad_enabled() and stop == start else None
            feats = encode_images_exchange(self.image_features, share, image_exchange, cp_group_of(self.config),
                                           hidden_size=emb.shape[-1], zero=zero)
            if feats.shape[0] != n_ctx:
                raise ValueError(f"{n_ctx} <IMG_CONTEXT> tokens (id {self.img_context_token_id}) on this CP rank "
                                 f"but {feats.shape[0]} image features exchanged to it")
            return self._scatter_features(emb, ctx, feats)
        if pixel_values is None or pixel_values.shape[0] == 0:
            if n_ctx:
                raise ValueError(f"{n_ctx} <IMG_CONTEXT> tokens (id {self.img_context_token_id}) but no pixel_values")
            zero = self._vision_params_zero() if self.training and torch.is_grad_enabled() else None
            return emb if zero is None else emb + zero.to(emb.dtype)
        # Under CP every rank holds the pack's tiles: each encodes a share, the features are gathered.
        feats = encode_images_cp(self.image_features, pixel_values, cp_group_of(self.config))
        feats = feats.reshape(-1, feats.shape[-1])
        if image_feature_index is not None:
            feats = feats.index_select(0, image_feature_index.to(feats.device))
        if feats.shape[0] != n_ctx:
            raise ValueError(f"{n_ctx} <IMG_CONTEXT> tokens (id {self.img_context_token_id}) but "
                             f"{feats.shape[0]} image features ({pixel_values.shape[0]} tiles x "
                             f"{feats.shape[0] // max(pixel_values.shape[0], 1)} tokens)")
        return self._scatter_features(emb, ctx, feats)

    @staticmethod
    def _scatter_features(emb: Tensor, ctx: Tensor, feats: Tensor) -> Tensor:
        bsh = emb.transpose(0, 1)                                         # [b, s, h], row-major like HF
        bsh = bsh.masked_scatter(ctx.unsqueeze(-1).to(bsh.device), feats.to(bsh.dtype))
        return bsh.transpose(0, 1).contiguous()

    def forward(self, input_ids: Optional[Tensor], position_ids: Tensor, pixel_values: Optional[Tensor] = None, *,
                labels: Optional[Tensor] = None, packed_seq_params: Optional[PackedSeqParams] = None,
                image_feature_index: Optional[Tensor] = None, image_exchange=None,
                image_token_count: Optional[int] = None) -> Tensor:
        decoder_input = None
        if self.pre_process:
            decoder_input = self.language_model.scatter_sp(self.merge(input_ids, pixel_values, image_feature_index,
                                                                      image_exchange, image_token_count))
        return self.language_model(None, position_ids, decoder_input=decoder_input, labels=labels,
                                   packed_seq_params=packed_seq_params)

    @torch.no_grad()
    def logits(self, input_ids: Tensor, pixel_values: Optional[Tensor], position_ids: Optional[Tensor] = None
               ) -> Tensor:
        """float32 logits [B, S, V] (gathered over TP, padding dropped); needs pre and post process
        on this rank (no pipeline parallelism). ``position_ids`` default to ``arange``."""
        if not (self.pre_process and self.post_process):
            raise RuntimeError("InternVLModel.logits needs the whole model on this rank (pp=1)")
        dev = next(self.parameters()).device
        input_ids = input_ids.to(dev)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], dtype=torch.float64, device=dev).expand_as(input_ids)
        position_ids = torch.as_tensor(position_ids).to(device=dev, dtype=torch.float64)
        if pixel_values is not None:
            pixel_values = pixel_values.to(device=dev, dtype=self.config.params_dtype)
        out = self.forward(input_ids, position_ids, pixel_values)
        if ps.get_tensor_model_parallel_world_size() > 1:
            out = tensor_parallel.gather_from_tensor_model_parallel_region(out)
        return out[..., : self.vocab_size].float()


class _MetaDevice(TorchFunctionMode):
    """Parameters on ``meta`` whatever device their module names.

    megatron's parallel layers allocate with ``torch.empty(..., device=torch.cuda.current_device())``,
    a device the ``meta`` default does not override. Transformer Engine's modules get that device
    from megatron too (``_get_extra_te_kwargs``), allocate with ``torch.empty(..., device=device)``
    and then, because the device is not ``meta``, run ``reset_parameters`` at once, which re-makes
    every meta parameter with ``torch.empty_like(param, device="cuda")`` and fills it (TE's
    ``module/base.py``; ``ops/basic/layer_norm.py`` likewise). This mode sends both ``empty`` and
    ``empty_like`` with an explicit device to ``meta``: their values are undefined anyway, so
    nothing can depend on them, and TE's initialization then runs on meta tensors (no memory, no
    values) and still sets the attributes the converter reads (``tensor_model_parallel``,
    ``partition_dim``). Not ``config.init_model_with_meta_device``: with it TE skips
    ``reset_parameters`` altogether, and with it the tensor-parallel tags. Other constructors that
    name a device keep it: they make small tensors the constructor reads back (drop-path rates,
    rotary frequencies)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if getattr(func, "__name__", None) in ("empty", "empty_like") and kwargs.get("device") is not None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextlib.contextmanager
def _on_meta():
    with torch.device("meta"), _MetaDevice():
        yield


def build_model(model_cfg: ModelConfig, layout: Layout, *, recompute: str = "none",
                pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                core_attention: type | None = None, vp_stage: Optional[int] = None,
                meta: bool = False) -> InternVLModel:
    """The InternVL model for this rank's pipeline stage, on this rank's device.

    ``layout``: a resolved layout (``spec`` te or local; see ``Layout.resolved``) matching megatron's
    initialized parallel state. ``pre_process``/``post_process`` default to the first/last pipeline
    stage (of virtual stage ``vp_stage``, interleaved pipelines: one call per model chunk).
    ``core_attention``: see :func:`v2pe_megatron.model.language.build_language_model`.
    ``meta``: every tensor on the ``meta`` device (shapes, dtypes and sharding only, no memory): what
    the converter needs for megatron's sharded state dict while it streams the data in itself.

    Called from a plain script (no process group, no megatron state) with a layout without model
    parallelism (tp = pp = cp = 1; any dp: every data-parallel rank holds the same model), it sets up
    a 1-rank process group and megatron state itself, as ``hf.load`` does; they live as long as the
    model (``model.release_process_group()`` releases them now). Model-parallel layouts need their
    ranks: a clear error says so.
    """
    if layout.spec not in ("te", "local"):
        raise ValueError(f"build_model needs a resolved layout (spec te or local), got spec={layout.spec!r}; "
                         f"use layout.resolved()")
    from v2pe_megatron.runtime.distributed import device, release_with, standalone_model_parallel

    owned = standalone_model_parallel("build_model", layout.tp, layout.pp, layout.cp)
    try:
        virtual = vp_stage is not None
        if pre_process is None:
            pre_process = ps.is_pipeline_first_stage(ignore_virtual=not virtual, vp_stage=vp_stage)
        if post_process is None:
            post_process = ps.is_pipeline_last_stage(ignore_virtual=not virtual, vp_stage=vp_stage)
        with _on_meta() if meta else contextlib.nullcontext():
            model = InternVLModel(model_cfg, layout, recompute=recompute, pre_process=pre_process,
                                  post_process=post_process, core_attention=core_attention, vp_stage=vp_stage)
        if not meta:
            # megatron's parallel layers are created on the device already; the torch conv/norms are not.
            model = model.to(device())
    except BaseException:
        if owned is not None:
            owned.close()
        raise
    if owned is not None:
        release_with(model, owned)
    return model


def parameter_count(model_cfg: ModelConfig) -> int:
    """Analytic parameter count from the shapes (unpadded vocab), as the HF checkpoints count it."""
    from v2pe_megatron import plan  # torch-free, so v2pe-train and v2pe-plan count without building

    return plan.parameter_count(model_cfg)
