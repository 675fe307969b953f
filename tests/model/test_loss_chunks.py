"""The chunked vocab-parallel loss (``model.loss_chunk_tokens``): the same per-token loss and every
gradient (output layer, final norm, the hidden states) as the one-piece loss, at TP=1 and at TP=2
with and without sequence parallelism; and no logits tensor larger than one chunk is kept for
backward or made at all, forward or backward. Then the loss on trained tokens only (below), on the
same two models.
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


# ---------------------------------------------------------------------------------------------
# The output layer and cross entropy on the trained tokens only (``PackParams.loss_rows``, set by
# the context-parallel split from the host loss mask): the same masked loss and every gradient as
# the full computation, at TP=1 and TP=2, one piece and chunked; no logits row of an untrained token
# is made; the split's index is the mask's, in the hidden states' s-major order, in sbhd and thd,
# and travels with the batch to the device.
# ---------------------------------------------------------------------------------------------
def compare_rows(tp: int = 1, sp: bool = False) -> dict:
    """Loss, gradients and the most logits rows made, without and with ``loss_rows``."""
    from v2pe_megatron.parallel.packed_seq import PackParams, loss_rows
    from v2pe_megatron.runtime.distributed import model_parallel

    torch.set_num_threads(1)
    with model_parallel(tp=tp):
        whole, chunked = _models(tp, sp)
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, whole.vocab_size, (ROWS, SEQ), generator=g)
        labels = torch.randint(0, whole.vocab_size, (ROWS, SEQ), generator=g)
        mask = (torch.rand(ROWS, SEQ, generator=g) > 0.7).float()
        pos = torch.arange(SEQ, dtype=torch.float64).expand(ROWS, SEQ)
        vocab_local = whole.output_layer.weight.shape[0]
        out = {"trained": int(mask.sum()), "vocab_local": vocab_local, "sp": sp}
        for name, model in (("whole", whole), ("chunked", chunked)):
            for rows in (None, loss_rows(mask)):
                model.zero_grad(set_to_none=True)
                made = []
                hook = model.output_layer.register_forward_hook(lambda m, i, o: made.append(o[0].shape[0] * o[0].shape[1]))
                loss = model(tokens, pos, labels=labels, packed_seq_params=PackParams(qkv_format="sbhd", loss_rows=rows))
                hook.remove()
                (loss * mask).sum().backward()
                out[name, rows is not None] = {
                    "loss": (loss * mask).detach(), "rows_made": max(made),
                    "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    return out


def _check_rows(res: dict) -> None:
    for name in ("whole", "chunked"):
        full, picked = res[name, False], res[name, True]
        torch.testing.assert_close(picked["loss"], full["loss"], rtol=1e-6, atol=1e-6)
        assert picked["grads"].keys() == full["grads"].keys()
        assert any("output_layer" in n for n in full["grads"])
        for n, g in full["grads"].items():
            torch.testing.assert_close(picked["grads"][n], g, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
        # the output layer saw every token without the index, only the trained ones with it
        assert full["rows_made"] == (SEQ * ROWS if name == "whole" else CHUNK * ROWS)
        if res["sp"]:  # the output layer gathers the sequence over TP: the full computation stays
            assert picked["rows_made"] == full["rows_made"]
        else:
            assert picked["rows_made"] == (res["trained"] if name == "whole" else min(CHUNK, res["trained"]))
    assert 0 < res["trained"] < SEQ * ROWS // 2


def test_trained_rows_loss_matches_the_full_loss_tp1():
    _check_rows(compare_rows())


def run_rows_tp2(sp: bool) -> dict:
    return compare_rows(2, sp)


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True])
def test_trained_rows_loss_matches_the_full_loss_tp2(sp):
    for res in run_distributed(run_rows_tp2, 2, sp, timeout=240):
        _check_rows(res)


@pytest.mark.parametrize("fmt,cp", [("sbhd", 1), ("sbhd", 2), ("thd", 2)])
def test_the_split_takes_the_index_from_the_rank_share_of_the_mask(fmt, cp):
    from v2pe_megatron.parallel.batch import MicroBatch
    from v2pe_megatron.parallel.packed_seq import split_batch_for_cp

    g = torch.Generator().manual_seed(2)
    S = 16
    mask = (torch.rand(2, S, generator=g) > 0.5).float()
    tokens = torch.arange(2 * S).reshape(2, S)
    batch = MicroBatch(tokens=tokens, labels=tokens + 1, loss_mask=mask,
                       position_ids=torch.zeros(2, S, dtype=torch.float64),
                       seq_lens=[torch.tensor([8, 8], dtype=torch.int32)] * 2)
    for rank in range(cp):
        share = split_batch_for_cp(batch, cp_size=cp, cp_rank=rank, qkv_format=fmt)
        rows = share.packed_seq_params.loss_rows
        s_major = share.loss_mask.t().reshape(-1)
        assert torch.equal(rows, torch.nonzero(s_major).flatten())
        # the rows pick exactly the trained tokens (token values are unique here) out of the s-major order
        assert sorted(share.tokens.t().reshape(-1)[rows].tolist()) == sorted(share.tokens[share.loss_mask.bool()].tolist())
        moved = share.to("cpu")
        assert torch.equal(moved.packed_seq_params.loss_rows, rows)
