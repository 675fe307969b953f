"""``hf.load``: an HF InternVL checkpoint as our model, whole, in this process (TP = PP = 1)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

import torch

from v2pe_megatron.config import ModelConfig
from v2pe_megatron.convert.errors import HFCheckpointError
from v2pe_megatron.convert.hf_config import TOKEN_FILES, model_config_from_hf, read_config, special_token_ids
from v2pe_megatron.convert.mappings import hf_to_megatron, weight_map
from v2pe_megatron.convert.safetensors_io import canonical_native_names, read_safetensors
from v2pe_megatron.model.checkpoint_names import checkpoint_name


def hf_model_config(hf_dir: str | os.PathLike, img_context_token_id: Optional[int] = None
                    ) -> tuple[ModelConfig, str, dict]:
    """(ModelConfig with the special token ids, layout, config.json) of an HF checkpoint folder."""
    d = Path(hf_dir)
    cfg = read_config(d)
    mc, layout = model_config_from_hf(cfg)
    toks = special_token_ids(d)
    if img_context_token_id is not None:
        vocab = mc.language.vocab_size
        if not 0 <= int(img_context_token_id) < vocab:
            raise HFCheckpointError(f"{d}: img_context_token_id {img_context_token_id} is not a token id of this "
                                    f"model (vocabulary {vocab})")
        mc.img_context_token_id = int(img_context_token_id)
    elif "<IMG_CONTEXT>" in toks:
        mc.img_context_token_id = toks["<IMG_CONTEXT>"]
    elif layout == "remote" or "image_token_id" not in cfg:
        present = [f for f in TOKEN_FILES if (d / f).is_file()]
        where = (f"none of {', '.join(TOKEN_FILES)} is in the folder" if not present else
                 f"{', '.join(present)} do{'es' if len(present) == 1 else ''} not list it")
        raise HFCheckpointError(
            f"{d}: no id for the <IMG_CONTEXT> token: {where}. Copy the model's tokenizer files into the folder, "
            "or give the id: --img-context-token-id N (v2pe-convert import-hf), img_context_token_id=N (hf.load)")
    if "<img>" in toks:
        mc.img_start_token_id = toks["<img>"]
    if "</img>" in toks:
        mc.img_end_token_id = toks["</img>"]
    return mc, layout, cfg


def _ensure_single_rank(stack: contextlib.ExitStack) -> None:
    """megatron state with tp = pp = 1 for the rest of ``stack``: the caller's, or a 1-rank one."""
    from megatron.core import parallel_state as ps

    from v2pe_megatron.runtime.distributed import standalone_model_parallel

    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
            raise RuntimeError("hf.load builds a whole model in this process: it needs tp=1 and pp=1 "
                               "(or no model-parallel state at all); convert to a torch_dist checkpoint "
                               "with `v2pe-convert import-hf` instead")
        return
    stack.enter_context(standalone_model_parallel("hf.load"))


def load(hf_dir: str | os.PathLike, *, img_context_token_id: Optional[int] = None, dtype: str = "fp32",
         spec: str = "auto"):
    """The InternVL model of an HF checkpoint directory, in eval mode, in this process.

    ``img_context_token_id``: overrides the id read from the tokenizer files (``<IMG_CONTEXT>``) or
    from ``config.json`` (``image_token_id``). Sets up a 1-rank process group and megatron state if
    none exists; they stay alive with the model and are torn down when it is collected, or at the
    latest when the interpreter exits (``model.release_process_group()`` does it now).
    """
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import Layout, resolve_spec
    from v2pe_megatron.runtime.distributed import device, release_with

    d = Path(hf_dir)
    mc, layout, _ = hf_model_config(d, img_context_token_id)
    mc.dtype = dtype
    mc.spec = resolve_spec(spec, mc.dtype)

    hf = read_safetensors(d)
    if layout == "native":
        hf = canonical_native_names(hf)
    table = weight_map(mc, layout)

    stack = contextlib.ExitStack()
    _ensure_single_rank(stack)
    try:
        model = build_model(mc, Layout(spec=mc.spec), pre_process=True, post_process=True)
        # the table speaks checkpoint names, the same for both specs
        own = {checkpoint_name(k): tuple(v.shape) for k, v in model.state_dict().items()
               if not k.endswith("_extra_state")}
        state = hf_to_megatron(table, hf, own)
        unfilled = sorted(set(own) - set(state))
        if unfilled:
            raise HFCheckpointError(f"megatron parameter {unfilled[0]} has no HF tensor in the table")
    except BaseException:
        stack.close()
        raise
    with torch.no_grad():
        params = {checkpoint_name(k): p for k, p in model.named_parameters()}
        for k, t in state.items():
            params[k].copy_(t.to(params[k].dtype))
    model.to(device())
    model.eval()
    release_with(model, stack)  # the 1-rank process group lives as long as the model
    model.hf_layout = layout
    return model
