"""The typed mappings: each transform inverts exactly, and the table covers both layouts."""

from __future__ import annotations

import torch

from v2pe_megatron.convert.mappings import Copy, FusedQKV, GatedMLP, GroupedQKV, hf_shapes, weight_map


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def test_each_mapping_inverts_bit_exactly_and_orders_rows_like_megatron():
    nh, ng, d, h = 4, 2, 3, 5
    q, k, v = _rand(nh * d, h), _rand(ng * d, h), _rand(ng * d, h)
    g = GroupedQKV("a.{layer}", ("q.{layer}", "k.{layer}", "v.{layer}"), heads=nh, groups=ng).at(3)
    assert g.mcore == "a.3" and g.hf == ("q.3", "k.3", "v.3")
    fused = g.to_megatron([q, k, v])
    # group 0 = [q heads 0, 1; k head 0; v head 0]; group 1 likewise
    assert torch.equal(fused[: 2 * d], q[: 2 * d]) and torch.equal(fused[2 * d:3 * d], k[:d])
    assert torch.equal(fused[3 * d:4 * d], v[:d]) and torch.equal(fused[4 * d:6 * d], q[2 * d:])
    assert all(torch.equal(a, b) for a, b in zip(g.to_hf(fused), (q, k, v)))

    w = _rand(3 * nh * d, h)  # InternViT: [all q; all k; all v]
    f = FusedQKV("m", ("qkv",), heads=nh)
    per_head = f.to_megatron([w])
    assert torch.equal(per_head[d:2 * d], w[nh * d:nh * d + d])  # head 0's k rows follow its q rows
    assert torch.equal(f.to_hf(per_head)[0], w)

    gate, up = _rand(7, h), _rand(7, h)
    m = GatedMLP("fc1", ("gate", "up"))
    assert torch.equal(m.to_megatron([gate, up]), torch.cat([gate, up]))
    assert all(torch.equal(a, b) for a, b in zip(m.to_hf(m.to_megatron([gate, up])), (gate, up)))
    c = Copy("x", ("y",))
    assert c.to_megatron([gate]) is gate and c.to_hf(gate)[0] is gate
    assert hf_shapes(g, (2 * d * (nh // ng + 2) * ng // 2, h)) == [(nh * d, h), (ng * d, h), (ng * d, h)]


def test_tables_have_one_entry_per_megatron_name_and_unique_hf_names():
    from v2pe_megatron.testing.hf_fixtures import tiny_model_config

    mc = tiny_model_config()
    table = weight_map(mc, "remote")
    assert len({mp.mcore for mp in table}) == len(table)
    hf = [n for mp in table for n in mp.hf]
    assert len(set(hf)) == len(hf) and not any("{" in n for n in hf)
    mc.language.arch, mc.language.qkv_bias = "qwen2", True
    native = weight_map(mc, "native")
    names = {n for mp in native for n in mp.hf}
    assert "model.language_model.layers.3.self_attn.k_proj.bias" in names and "lm_head.weight" in names
    assert {type(mp).__name__ for mp in native} == {"Copy", "GroupedQKV", "GatedMLP"}
