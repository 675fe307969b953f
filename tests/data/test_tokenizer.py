"""Tokenizer layouts, the internlm2-chat template, <image> expansion and the assistant-only mask,
checked against sequences built by hand from the tokenizer's pieces."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import sentencepiece as spm

from v2pe_megatron.config import PRESETS
from v2pe_megatron.data.chat import ChatFormat, tokenize_sample
from v2pe_megatron.data.skips import SampleError
from v2pe_megatron.data.tokenizer import (
    SPECIAL_TOKENS, TokenizerError, load_tokenizer, save_tiny_tokenizer, tiny_tokenizer)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_tiny_tokenizer_ids_match_tiny_preset(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert [tok.sp.id_to_piece(i) for i in range(3, 8)] == ["<|im_end|>", "<|im_start|>", "<img>", "</img>",
                                                            "<IMG_CONTEXT>"]
    tiny = PRESETS["tiny"]
    assert (tok.img_start_id, tok.img_end_id, tok.img_context_id) == (
        tiny["img_start_token_id"], tiny["img_end_token_id"], tiny["img_context_token_id"])
    assert tok.vocab_size == tiny["language"]["vocab_size"] == 512


def test_encode_decode_round_trip_with_specials(tok):
    text = "<|im_start|>user\nWhat is  in <img><IMG_CONTEXT></img> the pïcture 漢字?<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == tok.im_start_id and ids[-1] == tok.im_end_id
    assert ids.count(tok.img_context_id) == 1
    assert max(ids) < tok.vocab_size
    assert tok.decode(ids) == text


def test_tiny_model_file_round_trip(tok, tmp_path):
    path = save_tiny_tokenizer(tok, tmp_path / "tokenizer.model")
    again = load_tokenizer(path)
    assert again.encode("hello <img> world") == tok.encode("hello <img> world")
    assert again.img_context_id == 7


def _plain_sp_model(tmp_path, vocab=300):
    """A model without the specials, like InternLM2's tokenizer.model."""
    buf = io.BytesIO()
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world what is in the picture"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=vocab,
                                   model_type="bpe", byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
    p = tmp_path / "tokenizer.model"
    p.write_bytes(buf.getvalue())
    return p


def test_added_tokens_from_json_files(tmp_path):
    p = _plain_sp_model(tmp_path)
    n = spm.SentencePieceProcessor(model_file=str(p)).get_piece_size()
    added = {t: n + i for i, t in enumerate(SPECIAL_TOKENS)}
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    t = load_tokenizer(tmp_path)
    assert (t.im_end_id, t.im_start_id, t.img_start_id, t.img_end_id, t.img_context_id) == tuple(
        n + i for i in range(5))
    assert t.vocab_size == n + len(SPECIAL_TOKENS)
    ids = t.encode("hello<img><IMG_CONTEXT></img>world")
    assert ids[ids.index(n + 2):ids.index(n + 2) + 3] == [n + 2, n + 4, n + 3]
    assert t.decode(ids) == "hello<img><IMG_CONTEXT></img>world"

    # tokenizer_config.json's added_tokens_decoder (the HF layout) works the same way
    (tmp_path / "added_tokens.json").unlink()
    dec = {str(v): {"content": k, "special": True} for k, v in added.items()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": dec,
                                                                "pad_token": "</s>"}))
    t2 = load_tokenizer(tmp_path / "tokenizer.model")
    assert t2.img_context_id == n + 4 and t2.pad_id == t2.eos_id


def test_known_internvl2_table_and_missing_ids(tmp_path):
    p = _plain_sp_model(tmp_path)
    # The InternVL2-2B table applies when the ids lie past the sentencepiece vocab.
    t = load_tokenizer(p)
    assert (t.im_end_id, t.im_start_id, t.img_start_id, t.img_end_id, t.img_context_id) == (
        92542, 92543, 92544, 92545, 92546)
    assert t.vocab_size == 92553
    with pytest.raises(TokenizerError, match="added_tokens.json"):
        load_tokenizer(p, known_added={})


def _hand(tok, *parts):
    """Concatenate (ids, is_target) parts."""
    ids = [i for p, _ in parts for i in p]
    tgt = [t for p, t in parts for _ in p]
    return np.asarray(ids, np.int64), np.asarray(tgt, bool)


def test_internlm2_chat_template_and_mask(tok):
    conv = [{"from": "human", "value": "Hi <image>\nwhat?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "More?"}, {"from": "gpt", "value": "No."}]
    nit, tiles = 4, [3]
    got = tokenize_sample(tok, conversations=conv, tiles_per_image=tiles, num_image_token=nit,
                          chat=ChatFormat(system="Be brief."))
    img = [tok.img_start_id] + [tok.img_context_id] * (nit * 3) + [tok.img_end_id]
    e = tok.encode
    want_ids, want_tgt = _hand(
        tok,
        ([tok.bos_id], False),
        ([tok.im_start_id], False), (e("system\nBe brief."), False), ([tok.im_end_id], False),
        ([tok.im_start_id], False), (e("user\n"), False), (e("Hi "), False), (img, False), (e("\nwhat?"), False),
        ([tok.im_end_id], False),
        ([tok.im_start_id], False), (e("assistant\n"), False), (e("A cat."), True), ([tok.im_end_id], True),
        ([tok.im_start_id], False), (e("user\n"), False), (e("More?"), False), ([tok.im_end_id], False),
        ([tok.im_start_id], False), (e("assistant\n"), False), (e("No."), True), ([tok.im_end_id], True),
    )
    np.testing.assert_array_equal(got.ids, want_ids)
    np.testing.assert_array_equal(got.target, want_tgt)
    assert got.num_images == 1
    # the rendered text is the documented template
    assert tok.decode(got.ids).replace("<IMG_CONTEXT>" * 12, "<IMG_CONTEXT>*12") == (
        "<s><|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi <img><IMG_CONTEXT>*12</img>\nwhat?"
        "<|im_end|><|im_start|>assistant\nA cat.<|im_end|><|im_start|>user\nMore?<|im_end|>"
        "<|im_start|>assistant\nNo.<|im_end|>").replace("<s>", tok.decode([tok.bos_id]))


def test_single_image_without_placeholder_goes_first(tok):
    conv = [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Red."}]
    got = tokenize_sample(tok, conversations=conv, tiles_per_image=[1], num_image_token=4)
    explicit = tokenize_sample(tok, conversations=[{"from": "human", "value": "<image>\nDescribe."},
                                                   {"from": "gpt", "value": "Red."}],
                               tiles_per_image=[1], num_image_token=4)
    np.testing.assert_array_equal(got.ids, explicit.ids)


@pytest.mark.parametrize("conv,tiles,reason", [
    ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}], [1], "image_count_mismatch"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}], [1, 1], "image_count_mismatch"),
    ([], [], "empty_conversation"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}], [], "empty_conversation"),
    ([{"from": "human", "value": "sneaky <IMG_CONTEXT>"}, {"from": "gpt", "value": "x"}], [], "bad_markup"),
])
def test_conversation_errors(tok, conv, tiles, reason):
    with pytest.raises(SampleError) as ei:
        tokenize_sample(tok, conversations=conv, tiles_per_image=tiles, num_image_token=4)
    assert ei.value.reason == reason


def test_plain_text_sample_and_plain_template(tok):
    got = tokenize_sample(tok, text="hello world", num_image_token=4)
    np.testing.assert_array_equal(got.ids, [tok.bos_id, *tok.encode("hello world"), tok.eos_id])
    np.testing.assert_array_equal(got.target, [False] + [True] * (got.ids.size - 1))
    conv = [{"from": "human", "value": "q? "}, {"from": "gpt", "value": "a."}]
    got = tokenize_sample(tok, conversations=conv, chat=ChatFormat("plain", ""), num_image_token=4)
    # "q? a." is encoded whole, as a tokenizer encodes the rendered text: "▁a" carries the space
    # between question and answer and is a target (it holds the answer's first character).
    text_ids, spans = tok.encode_spans("q? a.")
    assert [tok.sp.id_to_piece(i) for i in text_ids] == ["q", "?", "\u2581a", "."]
    np.testing.assert_array_equal(got.ids, [tok.bos_id, *text_ids, tok.eos_id])
    np.testing.assert_array_equal(got.target, [False, False, False, True, True, True])
