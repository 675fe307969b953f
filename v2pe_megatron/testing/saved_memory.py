"""What a model really keeps for backward: the bytes of the tensors autograd saves during one forward
(and the loss), counted with ``torch.autograd.graph.saved_tensors_hooks``.

A saved tensor is counted by its storage, once however many views of it are saved, and only if it
is still held when the forward ends (an intermediate graph that was dropped frees its tensors);
parameters are not activations and are left out. This is what the planner's activation model
(``v2pe_megatron.plan.activation_bytes``, path ``local``) is checked against.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["saved_bytes", "image_pack", "measure_internvl"]


def saved_bytes(fn: Callable[[], Any], exclude: Any = ()) -> tuple[int, Any]:
    """(bytes of the distinct storages saved for backward by ``fn()`` and still held, ``fn()``'s result);
    storages of the tensors in ``exclude`` (e.g. the parameters) are not counted."""
    held: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        held.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}
    for ref in held:
        t = ref()
        if t is None:
            continue
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen.setdefault(st.data_ptr(), st.nbytes())
    return sum(seen.values()), result


def image_pack(model_cfg: Any, *, tokens: int, tiles: int, sub_samples: int = 2, pad_multiple: int = 1,
               seed: int = 0):
    """One [1, tokens] packed ``MicroBatch`` of ``sub_samples`` equal sub-samples (lengths padded to
    ``pad_multiple``) with ``tiles`` image tiles' tokens from position 1 on (they may run past the first
    sub-sample: what the forward keeps does not depend on where the image tokens are)."""
    from v2pe_megatron.parallel.batch import MicroBatch

    n_img = model_cfg.num_image_token
    if tiles * n_img + 1 > tokens:
        raise ValueError(f"{tiles} tiles x {n_img} tokens do not fit a {tokens}-token pack")
    g = torch.Generator().manual_seed(seed)
    vocab = model_cfg.language.vocab_size
    ids = torch.randint(10, min(vocab, 500), (1, tokens), generator=g)
    ids[0, 1:1 + tiles * n_img] = model_cfg.img_context_token_id
    base = tokens // sub_samples // pad_multiple * pad_multiple
    lens = [base] * (sub_samples - 1) + [tokens - base * (sub_samples - 1)]
    pos = np.concatenate([np.arange(n, dtype=np.float64) for n in lens])[None]
    side = model_cfg.vision.image_size
    return MicroBatch(tokens=ids, labels=torch.randint(10, min(vocab, 500), (1, tokens), generator=g),
                      loss_mask=torch.ones(1, tokens), position_ids=torch.from_numpy(pos),
                      seq_lens=[torch.tensor(lens, dtype=torch.int32)],
                      pixel_values=torch.randn(tiles, 3, side, side, generator=g) if tiles else None,
                      num_tiles=torch.tensor([tiles], dtype=torch.int32) if tiles else None)


def measure_internvl(model_cfg: Any, *, tokens: int, tiles: int, recompute: str = "none", sp: bool = False,
                     seed: int = 0) -> tuple[int, int]:
    """(bytes this rank's InternVL model (local spec, fp32, built for the current megatron parallel
    state) keeps for backward over one forward of an :func:`image_pack` and its masked loss sum,
    tiles whose pixels the rank holds: the storage behind its ``pixel_values``, which may be a view)."""
    from megatron.core import parallel_state as ps

    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import Layout
    from v2pe_megatron.training.forward import prepare_batch

    cp = ps.get_context_parallel_world_size()
    tp = ps.get_tensor_model_parallel_world_size()
    layout = Layout(tp=tp, cp=cp, dp=1, sp=sp, spec="local")
    torch.manual_seed(seed)
    model = build_model(model_cfg, layout, recompute=recompute)
    batch = image_pack(model_cfg, tokens=tokens, tiles=tiles, pad_multiple=layout.seq_multiple, seed=seed)
    b = prepare_batch(batch, layout, torch.device("cpu"), torch.float32, model_cfg.img_context_token_id)

    def step():
        out = model(b.tokens, b.position_ids, b.pixel_values, labels=b.labels, packed_seq_params=b.packed_seq_params,
                    image_exchange=b.image_exchange)
        return (out * b.loss_mask).sum()

    nbytes, _ = saved_bytes(step, exclude=list(model.parameters()))
    held = 0
    if b.pixel_values is not None:
        held = b.pixel_values.untyped_storage().nbytes() // (b.pixel_values[0].numel() * b.pixel_values.element_size())
    return nbytes, held


# A mid-size InternVL (between the tiny preset and InternVL2-2B): 112 px tiles of 14 px patches
# (64 patches + CLS, 16 LLM tokens per tile), ViT 3 x 256 wide, LLM 3 x 256 wide with 8 heads over 2 KV groups.
MID_OVERRIDES = ["model.preset=tiny", "model.vision.num_layers=3", "model.vision.hidden_size=256",
                 "model.vision.num_attention_heads=4", "model.vision.ffn_hidden_size=1024",
                 "model.vision.image_size=112", "model.vision.patch_size=14", "model.language.num_layers=3",
                 "model.language.hidden_size=256", "model.language.num_attention_heads=8",
                 "model.language.num_query_groups=2", "model.language.ffn_hidden_size=704",
                 "model.language.vocab_size=4096"]
MODELS = {"tiny": ["model.preset=tiny"], "mid": MID_OVERRIDES,
          # the chunked vocab-parallel loss: one chunk's logits at a time, recomputed in backward
          "mid-chunked": [*MID_OVERRIDES, "model.loss_chunk_tokens=256"]}


def measured_vs_planned(model: str, *, tokens: int, tiles: int, recompute: str, sp: bool = False) -> dict[str, Any]:
    """One measured point on this rank (current megatron parallel state) next to the planner's
    estimate for the same rank (``plan.activation_bytes``, path ``local``: activations + logits)."""
    from megatron.core import parallel_state as ps

    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.plan import activation_bytes

    cfg = load_recipe(None, MODELS[model]).model
    cp, tp = ps.get_context_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    measured, held = measure_internvl(cfg, tokens=tokens, tiles=tiles, recompute=recompute, sp=sp)
    planned = activation_bytes(cfg, tokens=tokens, tiles=tiles, dtype="fp32", tp=tp, cp=cp, sp=sp,
                               recompute=recompute, path="local", pixel_tiles=held,
                               loss_chunk_tokens=cfg.loss_chunk_tokens).saved
    return {"model": model, "tokens": tokens, "tiles": tiles, "tp": tp, "sp": sp, "cp": cp,
            "rank": ps.get_context_parallel_rank() if cp > 1 else ps.get_tensor_model_parallel_rank(),
            "recompute": recompute, "measured": measured, "planned": planned, "pixel_tiles": held,
            "ratio": planned / measured}
