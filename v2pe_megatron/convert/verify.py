"""``--verify``: both sides' forward on random multimodal inputs (V2PE positions included).

The HF side is transformers' own ``InternVLForConditionalGeneration`` for the transformers-native
layout (when transformers is installed), else the HF folder read through the mapping table
(``hf.load``); the megatron side is the torch_dist checkpoint loaded at TP = PP = 1. The HF side runs
first: megatron's CPU patches (set up with its process group) must not touch the reference.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional

import torch
from torch import Tensor

from v2pe_megatron.config import ModelConfig
from v2pe_megatron.convert.errors import VerifyError

TOLERANCE = 1e-4
DELTA = 1 / 16  # a V2PE step below 1, so the float positions really reach the rotary


def random_inputs(mc: ModelConfig, seed: int = 0) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Two batches (1 and 2 images) of random text around ``<img>`` + tiles + ``</img>``, with V2PE positions."""
    from v2pe_megatron.v2pe import compute_position_ids

    g = torch.Generator().manual_seed(seed)
    special = {mc.img_start_token_id, mc.img_end_token_id, mc.img_context_token_id}
    vocab = mc.language.vocab_size
    allowed = torch.tensor([i for i in range(min(vocab, 4096)) if i not in special])
    out = []
    for tiles in (1, 2):
        ctx = [mc.img_context_token_id] * (mc.num_image_token * tiles)
        text = allowed[torch.randint(0, len(allowed), (2, 12), generator=g)]
        rows = [text[r, :6].tolist() + [mc.img_start_token_id] + ctx + [mc.img_end_token_id] + text[r, 6:].tolist()
                for r in range(2)]
        ids = torch.tensor(rows)
        pixels = torch.randn(2 * tiles, mc.vision.num_channels, mc.vision.image_size, mc.vision.image_size,
                             generator=g)
        pos = torch.from_numpy(compute_position_ids(ids, img_start_id=mc.img_start_token_id,
                                                    img_end_id=mc.img_end_token_id,
                                                    img_context_id=mc.img_context_token_id, delta=DELTA))
        out.append((ids, pixels, pos))
    return out


def transformers_logits(hf_dir: str | os.PathLike, inputs) -> Optional[list[Tensor]]:
    """transformers' logits for a native-layout folder; None when transformers is not installed."""
    try:
        from transformers import InternVLForConditionalGeneration
    except ImportError:
        return None
    model = InternVLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        # with float positions transformers needs a mask: without one it reads non-unit position
        # steps as packed-sequence boundaries
        res = [model(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids),
                     position_ids=pos.float()).logits.float() for ids, px, pos in inputs]
    del model
    return res


def _ours(build: Callable[[], torch.nn.Module], inputs) -> list[Tensor]:
    model = build()
    model.eval()
    with torch.no_grad():
        return [model.logits(ids, px, pos).float().cpu() for ids, px, pos in inputs]


def compare(ref: list[Tensor], got: list[Tensor]) -> dict[str, float]:
    rel = max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-30)) for r, g in zip(ref, got))
    agree = torch.cat([(g.argmax(-1) == r.argmax(-1)).flatten() for r, g in zip(ref, got)]).float().mean()
    return {"max_rel_logits_diff": rel, "top1_agreement": float(agree)}


def verify_pair(hf_dir: str | os.PathLike, ckpt: str | os.PathLike, *, layout: str,
                tolerance: float = TOLERANCE) -> dict[str, float]:
    """Forward of the HF folder and of the megatron checkpoint on the same inputs; raises above ``tolerance``."""
    from v2pe_megatron.convert.load import _ensure_single_rank, hf_model_config, load
    from v2pe_megatron.convert.megatron import find_model_yaml, read_model_yaml
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import Layout, resolve_spec
    from v2pe_megatron.training.checkpointing import load_model_weights

    my = find_model_yaml(ckpt)
    mc = read_model_yaml(my) if my is not None else hf_model_config(hf_dir)[0]
    mc.spec = resolve_spec(mc.spec, mc.dtype)
    inputs = random_inputs(mc)
    ref = transformers_logits(hf_dir, inputs) if layout == "native" else None
    with contextlib.ExitStack() as st:
        _ensure_single_rank(st)
        if ref is None:
            ref = _ours(lambda: load(hf_dir, dtype=mc.dtype, img_context_token_id=mc.img_context_token_id), inputs)

        def from_ckpt():
            m = build_model(mc, Layout(spec=mc.spec), pre_process=True, post_process=True)
            load_model_weights(ckpt, m)
            return m

        got = _ours(from_ckpt, inputs)
    res = compare(ref, got)
    tol = tolerance if mc.dtype == "fp32" else max(tolerance, 2e-2)
    if res["max_rel_logits_diff"] > tol:
        raise VerifyError(f"verify: max relative logits difference {res['max_rel_logits_diff']:.3g} > {tol:g} "
                                f"(top-1 agreement {res['top1_agreement']:.4f}) between {hf_dir} and {ckpt}")
    return res
