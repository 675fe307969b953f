"""config.json <-> ModelConfig in both directions, both layouts, and the V2PE keys."""

from __future__ import annotations

import dataclasses

import pytest

from v2pe_megatron.convert.errors import HFCheckpointError
from v2pe_megatron.convert.hf_config import (hf_config_from_model, model_config_from_hf, v2pe_keys,
                                             v2pe_recipe_section)


def _shape_keys(d: dict, prefix: str = "") -> dict:
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size", "image_size", "patch_size", "force_image_size", "downsample_ratio", "rope_theta",
            "rms_norm_eps", "layer_norm_eps", "qkv_bias", "attention_bias", "tie_word_embeddings", "select_layer",
            "num_channels", "max_position_embeddings", "image_token_id")
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_shape_keys(v, f"{prefix}{k}."))
        elif k in keys:
            out[prefix + k] = v
    return out


def test_remote_config_round_trip_keeps_every_shape_key_and_the_unmodelled_ones():
    from test_hf_remote import _config

    src = _config()
    mc, layout = model_config_from_hf(src)
    out = hf_config_from_model(mc, "remote", source=src)
    assert model_config_from_hf(out) == (mc, "remote")
    for k, v in _shape_keys(src).items():
        assert _shape_keys(out)[k] == v, k
    assert out["max_dynamic_patch"] == 12 and out["llm_config"]["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    # from nothing: still a config the reader takes back to the same model
    fresh = hf_config_from_model(mc, "remote")
    assert model_config_from_hf(fresh)[0] == mc and fresh["architectures"] == ["InternVLChatModel"]


def test_native_config_round_trip_and_transformers_accepts_it():
    transformers = pytest.importorskip("transformers")
    from v2pe_megatron.testing.hf_fixtures import tiny_model_config

    mc = tiny_model_config()
    mc.language = dataclasses.replace(mc.language, arch="qwen2", qkv_bias=True)
    mc.img_context_token_id = 7
    cfg = hf_config_from_model(mc, "native")
    back, layout = model_config_from_hf(cfg)
    assert layout == "native" and back.language == mc.language and back.vision == mc.vision
    tc = transformers.InternVLConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    assert tc.text_config.num_key_value_heads == mc.language.num_query_groups
    with pytest.raises(HFCheckpointError, match="no InternLM2"):
        hf_config_from_model(tiny_model_config(), "native")


def test_v2pe_keys_as_the_reference_writes_them_and_carried_through():
    from test_hf_remote import _config

    assert v2pe_keys(1 / 16) == {"rope_pos_id_version": "v2pe_fix", "rope_pos_id_stride": 16,
                                 "rope_scaling": {"type": "v2pe", "factor": 1.0}}
    for bad in (0.3, 0.0, 1.5):
        with pytest.raises(HFCheckpointError, match="--v2pe-delta"):
            v2pe_keys(bad)
    mc, _ = model_config_from_hf(_config())
    out = hf_config_from_model(mc, "remote", v2pe_delta=0.25)
    assert (out["rope_pos_id_version"], out["rope_pos_id_stride"]) == ("v2pe_fix", 64)
    assert out["llm_config"]["rope_scaling"] == {"type": "v2pe", "factor": 1.0}
    # without the flag the source's keys survive, also into the other layout (top level only there)
    carried = hf_config_from_model(mc, "remote", source=out)
    assert carried["rope_pos_id_stride"] == 64 and carried["llm_config"]["rope_scaling"]["type"] == "v2pe"
    assert v2pe_recipe_section(out) == {"policy": "fixed", "delta": 0.25}
    assert v2pe_recipe_section({"rope_pos_id_version": "v2pe_rnd"}) == {"policy": "random"}
    assert v2pe_recipe_section(_config()) is None
