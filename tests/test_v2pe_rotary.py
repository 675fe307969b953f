"""V2PE rotary embedding: cos/sin from float64 positions, their accuracy, the rotation the model's
core attention applies (``apply_rotary``) against a float64 reference and megatron's own path, and the
float32 angles for megatron's path."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from v2pe_megatron.parallel.cp_split import split_for_cp, zigzag_index_map
from v2pe_megatron.testing.fakes import FakeGroup
from v2pe_megatron.v2pe import V2PERotaryEmbedding, apply_rotary, compute_position_ids

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.models.common.embeddings.rotary_pos_embedding import apply_rotary_pos_emb
    from megatron.core.transformer.transformer_config import TransformerConfig

D, BASE = 128, 1_000_000.0  # InternLM2: head dim 128, theta 1e6


def hf_cos_sin(pos: np.ndarray, dim: int = D, base: float = BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style rotary in float64: inv_freq = 1/base^(arange(0,d,2)/d), emb = cat(freqs, freqs)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = torch.from_numpy(np.asarray(pos, dtype=np.float64))[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def megatron_config() -> TransformerConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, apply_rope_fusion=False)


def far_positions(n: int = 4096) -> np.ndarray:
    """Positions of visual tokens near 2^20 with delta = 1/256."""
    return 2.0**20 + np.arange(n, dtype=np.float64) / 256.0


def test_layout_shape_dtype():
    m = V2PERotaryEmbedding(kv_channels=64, rotary_base=10_000.0)
    pos = np.stack([np.arange(5, dtype=np.float64), np.arange(5, dtype=np.float64) * 0.25])
    out = m(pos)
    assert out.shape == (5, 2, 1, 64) and out.dtype == torch.float32
    # NeoX layout: both halves are the same angles.
    torch.testing.assert_close(out[..., :32], out[..., 32:], rtol=0, atol=0)
    # [S, B, 1, D]: row 1 holds the quarter-step positions.
    inv = 1.0 / (10_000.0 ** (np.arange(0, 64, 2) / 64))
    np.testing.assert_allclose(out[3, 1, 0, :32].numpy(), 0.75 * inv, rtol=1e-6)
    # torch input, 1-D input (B = 1), and rotary_percent < 1.
    torch.testing.assert_close(m(torch.from_numpy(pos)), out)
    assert m(np.arange(7.0)).shape == (7, 1, 1, 64)
    assert V2PERotaryEmbedding(64, 10_000.0, rotary_percent=0.5)(pos).shape == (5, 2, 1, 32)


def test_bad_arguments():
    with pytest.raises(ValueError, match="even"):
        V2PERotaryEmbedding(63, 1e4)
    with pytest.raises(ValueError, match="rotary_percent"):
        V2PERotaryEmbedding(64, 1e4, rotary_percent=0.0)
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        V2PERotaryEmbedding(64, 1e4)(np.zeros((1, 2, 3)))


def test_half_precision_cast_does_not_touch_inv_freq():
    m = V2PERotaryEmbedding(D, BASE)
    before = m(far_positions(64)[None])
    m.bfloat16()
    assert m.inv_freq.dtype == torch.float64
    torch.testing.assert_close(m(far_positions(64)[None]), before, rtol=0, atol=0)
    assert "inv_freq" not in m.state_dict()


def test_cos_sin_match_float64_reference_near_2_pow_20():
    """At 2^20 + k/256 the cos/sin of our float32 freqs (what megatron evaluates) match a float64
    reference to 1.3e-7 (measured), while the reference implementation's approach is far off:
    (a) float32 positions and float32 angles: max |error| 0.11 (the float32 position grid alone is
    0.125 wide there, 0.0625 max rounding); (b) the same plus bf16 cos/sin: 0.11 as well (bf16 alone,
    on exact angles, adds 3.9e-3)."""
    pos = far_positions()
    cos64, sin64 = hf_cos_sin(pos)
    freqs = V2PERotaryEmbedding(D, BASE)(pos[None])[:, 0, 0, :]  # [S, D]
    ours = max((freqs.cos().double() - cos64).abs().max().item(), (freqs.sin().double() - sin64).abs().max().item())
    assert ours < 1e-6

    inv32 = 1.0 / (BASE ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    ang32 = torch.from_numpy(pos).float()[:, None] * inv32
    emb32 = torch.cat((ang32, ang32), dim=-1)
    fp32 = max((emb32.cos().double() - cos64).abs().max().item(), (emb32.sin().double() - sin64).abs().max().item())
    bf16 = max((emb32.cos().bfloat16().double() - cos64).abs().max().item(),
               (emb32.sin().bfloat16().double() - sin64).abs().max().item())
    bf16_only = max((cos64.bfloat16().double() - cos64).abs().max().item(),
                    (sin64.bfloat16().double() - sin64).abs().max().item())
    assert fp32 > 0.05 and bf16 > 0.05, (fp32, bf16)
    assert 1e-3 < bf16_only < 8e-3
    assert fp32 > 1e4 * ours


def test_megatron_apply_rotary_matches_float64_rotate_half():
    torch.manual_seed(0)
    ids_pos = compute_position_ids(
        np.array([[1] * 3 + [5] + [7] * 300 + [6] + [2] * 4, [5] + [7] * 300 + [6] + [2] * 7]),
        img_start_id=5, img_end_id=6, img_context_id=7, delta=[[1 / 256], [1 / 4]])
    for offset in (0.0, 2.0**20):  # a short sample and one far down a million-token pack
        pos = ids_pos + offset
        S, B, H = pos.shape[1], pos.shape[0], 3
        t = torch.rand(S, B, H, D, dtype=torch.float32) * 2 - 1
        freqs = V2PERotaryEmbedding(D, BASE)(pos)
        out = apply_rotary_pos_emb(t, freqs, config=megatron_config(), cp_group=FakeGroup(1, 0))
        cos64, sin64 = hf_cos_sin(pos.T)  # [S, B, D]
        t64 = t.double()
        ref = t64 * cos64[:, :, None] + rotate_half(t64) * sin64[:, :, None]
        assert (out.double() - ref).abs().max().item() < 1e-6


def test_cos_sin_round_once_from_float64():
    """cos/sin are evaluated in float64 and rounded once to the model dtype: at 2^20 + k/256 the
    float32 pair is the float64 reference rounded (|error| <= 6e-8), the bf16 pair bit-equal to it."""
    pos = far_positions()
    cos64, sin64 = hf_cos_sin(pos)                                     # [S, D]
    m = V2PERotaryEmbedding(D, BASE)
    cos, sin = m.cos_sin(pos[None])                                    # float32 [S, 1, 1, D]
    assert cos.shape == (pos.size, 1, 1, D) and cos.dtype == torch.float32
    assert (cos[:, 0, 0].double() - cos64).abs().max().item() <= 6e-8
    assert (sin[:, 0, 0].double() - sin64).abs().max().item() <= 6e-8
    cb, sb = m.cos_sin(torch.from_numpy(pos)[None], dtype=torch.bfloat16)
    assert torch.equal(cb[:, 0, 0], cos64.bfloat16()) and torch.equal(sb[:, 0, 0], sin64.bfloat16())
    # The angles megatron's path takes cos/sin of agree with them.
    freqs = m(pos[None])
    assert (freqs.cos() - cos).abs().max().item() < 1e-6


def test_apply_rotary_matches_float64_reference_and_megatron():
    torch.manual_seed(0)
    ids_pos = compute_position_ids(
        np.array([[1] * 3 + [5] + [7] * 300 + [6] + [2] * 4, [5] + [7] * 300 + [6] + [2] * 7]),
        img_start_id=5, img_end_id=6, img_context_id=7, delta=[[1 / 256], [1 / 4]])
    m = V2PERotaryEmbedding(D, BASE)
    for offset in (0.0, 2.0**20):
        pos = ids_pos + offset
        S, B, H = pos.shape[1], pos.shape[0], 3
        t = torch.rand(S, B, H, D, dtype=torch.float32) * 2 - 1
        cos, sin = m.cos_sin(pos)
        out = apply_rotary(t, cos, sin)
        cos64, sin64 = hf_cos_sin(pos.T)
        t64 = t.double()
        ref = t64 * cos64[:, :, None] + rotate_half(t64) * sin64[:, :, None]
        assert (out.double() - ref).abs().max().item() < 1e-6
        megatron = apply_rotary_pos_emb(t, m(pos), config=megatron_config(), cp_group=FakeGroup(1, 0))
        assert (out - megatron).abs().max().item() < 1e-6
        # Transformer Engine's packed layout: [t, heads, d] with [t, 1, d].
        thd = apply_rotary(t[:, 0], cos[:, 0], sin[:, 0])
        torch.testing.assert_close(thd, out[:, 0], rtol=0, atol=0)
    # A rotary dim below the head dim rotates the first channels only.
    half = V2PERotaryEmbedding(D, BASE, rotary_percent=0.5)
    t = torch.rand(5, 1, 2, D)
    c, s_ = half.cos_sin(np.arange(5.0)[None])
    out = apply_rotary(t, c, s_)
    torch.testing.assert_close(out[..., D // 2:], t[..., D // 2:], rtol=0, atol=0)
    torch.testing.assert_close(out[..., :D // 2], apply_rotary(t[..., :D // 2], c, s_), rtol=0, atol=0)


@pytest.mark.parametrize("cp", [2, 4])
def test_megatron_thd_path_with_full_freqs_matches_zigzag_map(cp):
    """The unfused THD path, given freqs for the whole pack, picks per rank exactly the rows our
    zigzag map selects: rotating the split q equals splitting the rotated q."""
    torch.manual_seed(0)
    lens = [8 * cp, 4 * cp, 2 * cp]
    total = sum(lens)
    pos = np.concatenate([np.arange(n) * 0.25 for n in lens])[None]  # positions restart per sub-sample
    freqs = V2PERotaryEmbedding(D, BASE)(pos)  # [T, 1, 1, D]
    t = torch.rand(total, 2, D)  # THD: [T, H, D]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    full = apply_rotary_pos_emb(t, freqs, config=megatron_config(), cu_seqlens=cu, cp_group=FakeGroup(1, 0))
    for rank in range(cp):
        idx = zigzag_index_map(lens, cp, rank)
        local = apply_rotary_pos_emb(split_for_cp(t, idx, 0), freqs, config=megatron_config(), cu_seqlens=cu,
                                     cp_group=FakeGroup(cp, rank))
        torch.testing.assert_close(local, split_for_cp(full, idx, 0), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_float64_reference():
    pos = far_positions()[None]
    m = V2PERotaryEmbedding(D, BASE)
    gpu = m(torch.from_numpy(pos).cuda())
    assert gpu.is_cuda and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), m(pos), rtol=0, atol=1e-6)
    assert m(pos, device="cuda").is_cuda
    cos64, _ = hf_cos_sin(pos[0])
    assert (gpu[:, 0, 0].cos().double().cpu() - cos64).abs().max().item() < 1e-6
    t = (torch.rand(pos.shape[1], 1, 2, D, device="cuda") * 2 - 1)
    out = apply_rotary_pos_emb(t, gpu, config=megatron_config(), cp_group=FakeGroup(1, 0))
    cos64, sin64 = hf_cos_sin(pos.T)
    t64 = t.double().cpu()
    ref = t64 * cos64[:, :, None] + rotate_half(t64) * sin64[:, :, None]
    assert (out.double().cpu() - ref).abs().max().item() < 1e-6
