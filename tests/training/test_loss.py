"""train.loss_reduction=square against a plain per-sub-sample computation in float64: over packs,
after the context-parallel split and with the weight sum taken over data-parallel ranks."""

from __future__ import annotations

import math

import pytest
import torch

from v2pe_megatron.parallel.packed_seq import split_batch_for_cp
from v2pe_megatron.testing.tiny import synthetic_packs
from v2pe_megatron.training import loss as L


def _batches(num=3, rows=2, seq_length=96, pad_multiple=4, seed=11):
    return synthetic_packs(num, rows=rows, seq_length=seq_length, pad_multiple=pad_multiple, seed=seed)


def _token_losses(batches, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b.tokens.shape, generator=g, dtype=torch.float64) * 5 for b in batches]


def _reference(batches, losses) -> float:
    """sum over sub-samples of sqrt(n) * mean(loss) / sum of sqrt(n): every trained token of a
    sub-sample with n trained tokens weighs 1/sqrt(n)."""
    num = den = 0.0
    for b, l in zip(batches, losses):
        for i, lens in enumerate(b.seq_lens):
            off = 0
            for n_tok in lens.tolist():
                m = b.loss_mask[i, off:off + n_tok].double()
                n = float(m.sum())
                if n:
                    mean = float((l[i, off:off + n_tok] * m).sum()) / n
                    num += math.sqrt(n) * mean
                    den += math.sqrt(n)
                off += n_tok
    return num / den


def _megatron_style(batches, losses) -> float:
    """What the schedule and train_step compute from the 3-tuples: sum(loss_sum) / sum(num_tokens)."""
    s = t = 0.0
    for b, l in zip(batches, losses):
        loss_sum, n, _ = L.weighted_loss_func(b.loss_mask, b.loss_weight)(l)
        s, t = s + float(loss_sum), t + int(n)
    return s / t


def test_weights_are_inverse_sqrt_of_trained_tokens_per_subsample():
    b = _batches(1)[0]
    w = L.subsample_weights(b.loss_mask, b.seq_lens)
    assert w.dtype == torch.float64
    for i, lens in enumerate(b.seq_lens):
        off = 0
        for n_tok in lens.tolist():
            m = b.loss_mask[i, off:off + n_tok].double()
            n = float(m.sum())
            want = m / math.sqrt(n) if n else torch.zeros_like(m)
            assert torch.equal(w[i, off:off + n_tok], want)
            off += n_tok
    assert torch.equal(L.subsample_weights(b.loss_mask, b.seq_lens, "token"), b.loss_mask.double())


def test_square_over_packs_matches_per_subsample_reference():
    batches = _batches()
    losses = _token_losses(batches)
    weighted = list(L.step_batches(iter(batches), len(batches), "square"))
    assert all(b.loss_weight is not None for b in weighted)
    assert _megatron_style(weighted, losses) == pytest.approx(_reference(batches, losses), rel=1e-6)
    token_mean = sum(float((l * b.loss_mask).sum()) for b, l in zip(batches, losses)) / sum(
        float(b.loss_mask.sum()) for b in batches)
    assert abs(token_mean - _reference(batches, losses)) > 1e-3  # the weighting is not a no-op here
    # token: the same path without weights draws nothing ahead.
    it = iter(batches)
    assert L.step_batches(it, len(batches), "token") is it


@pytest.mark.parametrize("qkv_format", ["sbhd", "thd"])
def test_square_after_context_parallel_split(qkv_format):
    batches = _batches()
    losses = _token_losses(batches)
    weighted = list(L.step_batches(iter(batches), len(batches), "square"))
    shares, share_losses = [], []
    for b, l in zip(weighted, losses):
        for rank in range(2):
            # The per-token losses ride in a sliced field so each share holds its own tokens' losses.
            s = split_batch_for_cp(b.replace(labels=l), cp_size=2, cp_rank=rank, qkv_format=qkv_format)
            assert s.loss_weight.shape == s.loss_mask.shape
            shares.append(s)
            share_losses.append(s.labels)
    assert _megatron_style(shares, share_losses) == pytest.approx(_reference(batches, losses), rel=1e-6)


def test_square_weight_sum_is_global_over_data_parallel_ranks(monkeypatch):
    # Two data-parallel ranks, each with its own micro-batches; all_reduce stands in for the other rank.
    batches = _batches(4)
    losses = _token_losses(batches)
    per_rank = [batches[0::2], batches[1::2]]

    def local_sums(bs):
        return torch.tensor([float(sum(b.loss_mask.double().sum() for b in bs)),
                             float(sum(L.subsample_weights(b.loss_mask, b.seq_lens).sum() for b in bs))],
                            dtype=torch.float64)

    weighted = []
    for r in range(2):
        other = local_sums(per_rank[1 - r])
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, group=None, other=other: t.add_(other))
        weighted += list(L.step_batches(iter(per_rank[r]), 2, "square", group=object()))
    order = [0, 2, 1, 3]  # the ranks' batches back in global order, with their losses
    assert _megatron_style(weighted, [losses[i] for i in order]) == pytest.approx(
        _reference(batches, losses), rel=1e-6)
