"""Transformer Engine's contract on the CPU (``testing.fake_te``): megatron's real TE wrappers on a
stand-in written from TE's source, and what the GPU path needs of our code.

- ``build_model(meta=True)`` under TE: every parameter on ``meta`` (TE re-makes meta parameters with
  ``empty_like(device="cuda")`` in ``reset_parameters``), tensor-parallel tags still set;
  ``import-hf --spec te`` writes the HF tensors.
- fp32: TE's attention has no backend for the TE spec's packed (thd) batches before 2.11 or with CP;
  the layout rule (``parallel.layout.te_dtype_problem``) refuses exactly those, ``v2pe-train`` exits
  2 before launch, and ``spec: auto`` with fp32 resolves to ``local`` saying so once.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from v2pe_megatron.testing import fake_te


def test_fake_is_installed_and_removed_cleanly():
    import megatron.core.extensions.transformer_engine as before
    import megatron.core.utils as mutils

    version = mutils.get_te_version()
    with fake_te.installed("2.11.0") as ext:
        assert ext.HAVE_TE and ext is not before
        assert mutils.is_te_min_version("2.11") and not mutils.is_te_min_version("2.12")
        assert issubclass(ext.TELayerNormColumnParallelLinear, fake_te.LayerNormLinear)
        assert issubclass(ext.TEDotProductAttention, fake_te.DotProductAttention)
    assert sys.modules["megatron.core.extensions.transformer_engine"] is before
    assert "transformer_engine" not in sys.modules and mutils.get_te_version() == version


def test_fake_linear_materializes_a_meta_build_like_te():
    """What the meta build has to prevent: TE's modules, given a device other than ``meta`` (megatron
    passes ``torch.cuda.current_device()``), fill their parameters at once, inside ``torch.device("meta")``
    too (here on the CPU: cpu_compat sends "cuda" to the CPU, as a GPU would keep it on the GPU)."""
    from v2pe_megatron.runtime.distributed import model_parallel

    with model_parallel(1, 1):
        with torch.device("meta"):
            lin = fake_te.Linear(8, 4, init_method=torch.nn.init.ones_, device=0)
        assert not lin.weight.is_meta and torch.equal(lin.weight, torch.ones(4, 8))
        deferred = fake_te.Linear(8, 4, init_method=torch.nn.init.ones_, device="meta")
        assert deferred.weight.is_meta and not hasattr(deferred.weight, "tensor_model_parallel")


def test_meta_build_under_te_is_all_meta_with_parallel_tags():
    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.model.internvl import build_model
    from v2pe_megatron.parallel.layout import Layout
    from v2pe_megatron.runtime.distributed import model_parallel

    mc = load_recipe(None, ["model.preset=tiny"]).model
    with model_parallel(1, 1), fake_te.installed():
        model = build_model(mc, Layout(spec="te"), meta=True)
        params = dict(model.named_parameters())
        assert not [k for k, p in params.items() if not p.is_meta]
        qkv = params["language_model.decoder.layers.0.self_attention.linear_qkv.weight"]
        proj = params["language_model.decoder.layers.0.self_attention.linear_proj.weight"]
        assert (qkv.tensor_model_parallel, qkv.partition_dim, proj.partition_dim) == (True, 0, 1)


@pytest.mark.slow
def test_import_hf_spec_te_writes_the_hf_tensors(tmp_path, monkeypatch):
    """``v2pe-convert import-hf --spec te``: a meta TE model, each tensor streamed from HF; the same
    checkpoint tensors as ``--spec local`` (one set of names), TE's extra state beside them."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    import v2pe_megatron.parallel.layout as layout_mod
    from v2pe_megatron.convert.megatron import export_hf, import_hf
    from v2pe_megatron.convert.safetensors_io import read_safetensors
    from v2pe_megatron.testing.hf_fixtures import remote_checkpoint, tiny_model_config

    tensors = remote_checkpoint(str(tmp_path / "hf"), tiny_model_config())
    import_hf(tmp_path / "hf", tmp_path / "local", progress=False)
    # the fake has no CUDA to go with it: take the spec as asked
    monkeypatch.setattr(layout_mod, "resolve_spec", lambda requested, dtype=None: requested)
    with fake_te.installed():
        import_hf(tmp_path / "hf", tmp_path / "te", spec="te", progress=False)
    assert any("linear_qkv._extra_state/" in k for k in load_sharded_metadata(str(tmp_path / "te")))
    a = dist_checkpointing.load_tensors_metadata(str(tmp_path / "local"))
    b = dist_checkpointing.load_tensors_metadata(str(tmp_path / "te"))
    assert set(a) == set(b)
    export_hf(tmp_path / "te", tmp_path / "out", layout="remote-code", progress=False)
    back = read_safetensors(tmp_path / "out")
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


# ------------------------------------------------------------------------------------------------
# fp32 and TE's attention backends
# ------------------------------------------------------------------------------------------------
VERSIONS = [(2, 8), (2, 10), (2, 11), (2, 15), (2, 16), (2, 18), (2, 20)]


@pytest.mark.parametrize("version", VERSIONS)
def test_layout_rule_is_tes_backend_rule(version):
    """The layout refuses te exactly where TE's backend selection leaves nothing for the TE spec's
    batches (thd; the packer's cu_seqlens have no padding between sub-samples)."""
    from v2pe_megatron.parallel.layout import te_dtype_problem

    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for cp in (1, 2):
            runs = bool(fake_te.attention_backends(dtype=torch_dtype, qkv_format="thd", context_parallel=cp > 1,
                                                   version=version))
            assert (te_dtype_problem(dtype, cp, version) is None) == runs, (version, dtype, cp)


def _thd_call(version: str, dtype: torch.dtype, *, cu_dtype=torch.int32):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from v2pe_megatron.runtime.distributed import model_parallel

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            attention_dropout=0.0, params_dtype=dtype, bf16=dtype == torch.bfloat16)
    with model_parallel(1, 1), fake_te.installed(version) as ext:
        attn = ext.TEDotProductAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                         attention_type="self")
        cu = torch.tensor([0, 5, 12], dtype=cu_dtype)
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                              cu_seqlens_kv_padded=cu, max_seqlen_q=7, max_seqlen_kv=7)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(12, 4, 8, generator=g).to(dtype)
        k, v = (torch.randn(12, 2, 8, generator=g).to(dtype) for _ in range(2))
        return attn(q, k, v, None, AttnMaskType.causal, packed_seq_params=psp)


def test_megatron_te_attention_on_the_fake_follows_tes_dtype_rule():
    with pytest.raises(ValueError, match="No dot product attention backend is available"):
        _thd_call("2.10.0", torch.float32)
    out = _thd_call("2.11.0", torch.float32)  # unfused takes thd from 2.11 on
    assert out.shape == (12, 32) and torch.isfinite(out).all()
    ref = _thd_call("2.8.0", torch.bfloat16)
    assert ref.dtype == torch.bfloat16 and float((ref.float() - out).abs().max()) < 5e-2


def test_fake_attention_checks_the_thd_contract():
    with pytest.raises(AssertionError, match="int32"):
        _thd_call("2.8.0", torch.bfloat16, cu_dtype=torch.int64)


def test_te_fp32_is_refused_before_launch(monkeypatch, capsys):
    """``v2pe-train`` exits 2 with one message naming the keys, before any rank starts."""
    import v2pe_megatron.parallel.layout as layout_mod
    from v2pe_megatron.cli.train import main

    recipe = str(Path(__file__).resolve().parents[2] / "recipes/tiny_cpu.yaml")
    assert main([recipe, "model.spec=te", "parallel.cp=2"]) == 2
    err = capsys.readouterr().err
    assert "model.spec=te with model.dtype=fp32 and parallel.cp=2" in err and "set model.dtype=bf16" in err
    assert main([recipe, "model.spec=te", "model.dtype=bf16", "parallel.cp=2", "--print-recipe"]) == 0
    monkeypatch.setattr(layout_mod, "te_version", lambda: (2, 10))  # the installed TE, as validate sees it
    assert main([recipe, "model.spec=te"]) == 2
    assert "Transformer Engine 2.10 has no fp32 attention" in capsys.readouterr().err
    monkeypatch.setattr(layout_mod, "te_version", lambda: (2, 11))
    assert main([recipe, "model.spec=te", "--print-recipe"]) == 0


def test_auto_with_fp32_resolves_to_local_and_says_so_once(monkeypatch, caplog):
    import v2pe_megatron.parallel.layout as layout_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(layout_mod, "have_transformer_engine", lambda: True)
    monkeypatch.setattr(layout_mod, "_said", set())
    with caplog.at_level(logging.WARNING, logger=layout_mod.__name__):
        assert layout_mod.resolve_spec("auto", "fp32") == "local"
        assert layout_mod.resolve_spec("auto", "fp32") == "local"
        assert layout_mod.resolve_spec("auto", "bf16") == "te"
        assert layout_mod.resolve_spec("te", "fp32") == "te"  # explicit: Layout.problems decides
    notes = [r.getMessage() for r in caplog.records if r.name == layout_mod.__name__]
    assert notes == [layout_mod.AUTO_FP32_NOTE] and "model.dtype=bf16" in notes[0]
