"""Presets carry the published shapes; the projector's pixel shuffle is InternVL's "v2" order."""

from __future__ import annotations

import pytest
import torch

from v2pe_megatron.config import load_recipe
from v2pe_megatron.model.internvl import parameter_count
from v2pe_megatron.model.language import padded_vocab_size
from v2pe_megatron.model.projector import pixel_shuffle

# Sizes the Hugging Face hub reports for the published checkpoints (safetensors metadata, rounded).
PUBLISHED = {"internvl2-1b": 938e6, "internvl2-2b": 2.21e9, "internvl2-8b": 8.08e9}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_parameter_count_matches_published(preset):
    model = load_recipe(None, [f"model.preset={preset}"]).model
    assert abs(parameter_count(model) - PUBLISHED[preset]) <= 0.01 * PUBLISHED[preset]
    assert model.num_image_token == 256


def test_parameter_count_catches_a_wrong_shape():
    model = load_recipe(None, ["model.preset=internvl2-1b", "model.language.ffn_hidden_size=4096"]).model
    assert abs(parameter_count(model) - PUBLISHED["internvl2-1b"]) > 0.01 * PUBLISHED["internvl2-1b"]


def test_pixel_shuffle_is_transformers_v2_order():
    from transformers.models.internvl.modeling_internvl import InternVLModel

    x = torch.randn(2, 8, 8, 6)
    ref = InternVLModel.pixel_shuffle(None, x, scale_factor=0.5)
    assert torch.equal(pixel_shuffle(x, 0.5), ref)
    # and it is not plain space-to-depth
    alt = torch.nn.functional.pixel_unshuffle(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    assert not torch.equal(pixel_shuffle(x, 0.5), alt)


def test_padded_vocab():
    assert padded_vocab_size(92553, 1) == 92553
    assert padded_vocab_size(92553, 2) == 92554
    assert padded_vocab_size(92553, 8) % 8 == 0
