"""The chunked vocab-parallel loss (``model.loss_chunk_tokens``): the same per-token loss and every
gradient (output layer, final norm, the hidden states) as the one-piece loss, at TP=1 and at TP=2
with and without sequence parallelism; and no logits tensor larger than one chunk is kept for
backward or made at all, forward or backward.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from v2pe_megatron.testing.distributed import run_distributed

SEQ, ROWS, CHUNK = 64, 2, 16


class _LargestLogits(TorchDispatchMode):
    """The largest tensor whose last dim is the local vocab that any op produces (the output layer's
    transposed [hidden, vocab/tp] weight aside)."""

    def __init__(self, vocab_local: int, hidden: int) -> None:
        super().__init__()
        self.vocab_local, self.weight_t, self.largest = vocab_local, (hidden, vocab_local), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab_local
                    and tuple(t.shape) != self.weight_t):
                self.largest = max(self.largest, t.numel())
        return out


def _models(tp: int, sp: bool):
    from v2pe_megatron.model.language import build_language_model
    from v2pe_megatron.testing.tiny import layout_of, tiny_recipe

    recipe = tiny_recipe(f"parallel.tp={tp}", f"parallel.sequence_parallel={sp}", f"data.seq_length={SEQ}",
                         "model.language.num_layers=1")
    torch.manual_seed(0)
    whole = build_language_model(recipe.model.language, layout_of(recipe))
    chunked = build_language_model(recipe.model.language, layout_of(recipe), loss_chunk_tokens=CHUNK)
    chunked.load_state_dict(whole.state_dict())
    return whole, chunked


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (ROWS, SEQ), generator=g)
    labels = torch.randint(0, vocab, (ROWS, SEQ), generator=g)
    mask = (torch.rand(ROWS, SEQ, generator=g) > 0.3).float()
    pos = torch.arange(SEQ, dtype=torch.float64).expand(ROWS, SEQ)
    return tokens, labels, mask, pos


def compare(tp: int = 1, sp: bool = False) -> dict:
    """Loss, per-parameter gradients, and the largest logits tensors saved / made, whole vs chunked."""
    from megatron.core import parallel_state as ps

    from v2pe_megatron.runtime.distributed import model_parallel

    torch.set_num_threads(1)
    with model_parallel(tp=tp):
        whole, chunked = _models(tp, sp)
        vocab_local = whole.output_layer.weight.shape[0]
        tokens, labels, mask, pos = _batch(whole.vocab_size)
        out = {}
        for name, model in (("whole", whole), ("chunked", chunked)):
            saved: list[int] = []

            def pack(t, saved=saved):
                if t.dim() >= 2 and t.shape[-1] == vocab_local:
                    saved.append(t.numel())
                return t

            made = _LargestLogits(vocab_local, whole.config.hidden_size)
            with made:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = model(tokens, pos, labels=labels)
                total = (loss * mask).sum()
                total.backward()
            out[name] = {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                         "saved": max(saved, default=0), "made": made.largest}
        # The hidden states' gradient, on the loss alone (the same final hidden into both losses).
        hidden = torch.randn(SEQ // (tp if sp else 1), ROWS, whole.config.hidden_size, requires_grad=True)
        ws = whole.compute_language_model_loss(labels, whole.output_layer(hidden)[0])
        gw, = torch.autograd.grad((ws * mask).sum(), hidden)
        cs = chunked.chunked_loss(hidden, labels)
        gc, = torch.autograd.grad((cs * mask).sum(), hidden)
        out["hidden"] = (gw, gc)
        out["vocab_local"], out["tp_rank"] = vocab_local, ps.get_tensor_model_parallel_rank()
    return out


def _check(res: dict, tp: int, sp: bool) -> None:
    w, c = res["whole"], res["chunked"]
    torch.testing.assert_close(c["loss"], w["loss"], rtol=1e-6, atol=1e-6)
    assert c["grads"].keys() == w["grads"].keys()
    assert any("output_layer" in n for n in w["grads"]) and any("final_layernorm" in n for n in w["grads"])
    for n, g in w["grads"].items():
        torch.testing.assert_close(c["grads"][n], g, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    torch.testing.assert_close(res["hidden"][1], res["hidden"][0], rtol=1e-5, atol=1e-6)
    whole_logits = SEQ * ROWS * res["vocab_local"]
    chunk_logits = CHUNK * ROWS * res["vocab_local"]
    # One piece: the whole [s, b, vocab/tp] logits are saved for backward (the test sees them) ...
    assert w["saved"] >= whole_logits and w["made"] >= whole_logits
    # ... chunked: nothing logits-shaped is saved, and nothing larger than a chunk is ever made.
    assert c["saved"] == 0, c["saved"]
    assert 0 < c["made"] <= chunk_logits, (c["made"], chunk_logits)


def test_chunked_loss_matches_the_one_piece_loss_tp1():
    _check(compare(), 1, False)


def run_tp2(sp: bool) -> dict:
    return compare(2, sp)


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True])
def test_chunked_loss_matches_the_one_piece_loss_tp2(sp):
    for res in run_distributed(run_tp2, 2, sp, timeout=240):
        _check(res, 2, sp)


def test_negative_chunk_is_refused():
    from v2pe_megatron.model.language import LanguageModel

    with pytest.raises(ValueError, match="loss_chunk_tokens must be >= 0"):
        LanguageModel(None, None, vocab_size=8, max_sequence_length=8, rotary_base=1e4, loss_chunk_tokens=-1)


def test_the_recipe_key_reaches_the_language_model():
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.runtime.distributed import model_parallel
    from v2pe_megatron.testing.tiny import layout_of, tiny_recipe

    recipe = tiny_recipe("model.loss_chunk_tokens=24", "model.language.num_layers=1")
    with model_parallel():
        assert build_model(recipe.model, layout_of(recipe)).language_model.loss_chunk_tokens == 24
