"""``v2pe-eval --prompt-style``: the prompt strings equal what MM-NIAH's and V2PE's own evaluation
code builds for the same line, the style's tile and new-token budgets, the system turn's default in
training and evaluation, and where ``--trained-positions`` comes from.

The reference strings are data (``fixtures/prompt_references.json``), made once at development time
by running the references' own prompt-building functions outside the project (the file's ``about``
says which; the commits are recorded in it)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from v2pe_megatron.data.chat import INTERNVL_SYSTEM_MESSAGE, ChatFormat, chat_format, render_conversation
from v2pe_megatron.data.needles import PROMPT_STYLES, read_mmniah
from v2pe_megatron.data.synthetic import encode_image
from v2pe_megatron.data.tiling import choose_grid, tiles_for
from v2pe_megatron.eval.runner import EvalSettings, prepare_sample

ROOT = Path(__file__).resolve().parents[2]
REFS = json.loads((Path(__file__).parent / "fixtures" / "prompt_references.json").read_text())
CASES = [(k, style) for k, c in enumerate(REFS["cases"]) for style in c["styles"]]


def test_the_references_are_recorded():
    assert REFS["references"] == {"OpenGVLab/MM-NIAH": "2fd03ddcf0fa9f028963af3de1eea3b538a4314a",
                                  "OpenGVLab/V2PE": "f96f18990e88f511ca0502b92fc30d8708ba3ada"}
    kinds = {c["task"] for c in REFS["cases"]}
    assert kinds == {"retrieval-text", "counting-text", "reasoning-text", "retrieval-image", "counting-image",
                     "reasoning-image"}
    assert set(PROMPT_STYLES) == {"mmniah", "v2pe", "v2pe-1m"} == set(REFS["cases"][0]["styles"])


@pytest.fixture(scope="module")
def mmniah_dir(tmp_path_factory):
    """The lines as MM-NIAH ships them (annotations/<task>.jsonl), images of the recorded sizes."""
    d = tmp_path_factory.mktemp("mm_niah_val")
    (d / "annotations").mkdir()
    for name, (w, h) in REFS["sizes"].items():
        (d / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (d / "images" / name).write_bytes(encode_image(np.zeros((h, w, 3), np.uint8), "png"))
    for k, c in enumerate(REFS["cases"]):
        (d / "annotations" / f"{c['task']}-{k}.jsonl").write_text(json.dumps(c["line"]) + "\n")
    return d


def _sample(d: Path, k: int):
    (s,) = read_mmniah(d / "annotations" / f"{REFS['cases'][k]['task']}-{k}.jsonl", d / "images")
    return s


@pytest.mark.parametrize("k, style", CASES)
def test_prompt_string_equals_the_references(mmniah_dir, k, style):
    ref = REFS["cases"][k]["styles"][style]
    st = PROMPT_STYLES[style]
    s = _sample(mmniah_dir, k)
    from v2pe_megatron.data.needles import prompt_of
    from v2pe_megatron.data.tiling import image_size_of

    text, names = prompt_of(s, style)
    assert names == ref["images"]
    tiles = [tiles_for(choose_grid(*image_size_of(s.load_image(n)), min_num=1, max_num=st.max_tiles,
                                   image_size=448), True) for n in names]
    assert tiles == ref["tiles"]
    got = render_conversation([{"from": "human", "value": text}, {"from": "gpt", "value": None}],
                              tiles_per_image=tiles, num_image_token=REFS["num_image_token"], chat=ChatFormat())
    assert got == ref["prompt"]


@pytest.fixture(scope="module")
def tok():
    from v2pe_megatron.data.tokenizer import tiny_tokenizer

    return tiny_tokenizer()


@pytest.mark.parametrize("style", list(PROMPT_STYLES))
def test_the_model_reads_the_reference_string(mmniah_dir, tok, style):
    """prepare_sample (what v2pe-eval feeds the model): its prompt ids spell the reference's string
    after <s>, at the style's tiles, for one line of each task kind."""
    st = PROMPT_STYLES[style]
    for k in range(0, len(REFS["cases"]), 2):
        ref = REFS["cases"][k]["styles"][style]
        p = prepare_sample(_sample(mmniah_dir, k), tok, lambda enc, grids: [
            np.zeros((t, 3, 2, 2), np.float32) for t in ref["tiles"]], image_size=448,
            num_image_token=REFS["num_image_token"], max_tiles=st.max_tiles, use_thumbnail=True,
            chat=ChatFormat(), style=style)
        assert p.num_tiles.tolist() == ref["tiles"]
        assert p.prompt[0] == tok.bos_id and tok.decode(p.prompt[1:]) == ref["prompt"], (k, style)


def test_style_budgets_and_explicit_flags_win():
    m = EvalSettings(deltas=[1.0])
    assert m.prompt_style == "mmniah" and m.max_tiles_per_image == 1
    assert [m.new_tokens(t) for t in ("counting-text", "counting-image", "retrieval-text")] == [32, 32, 16]
    v = EvalSettings(deltas=[1.0], prompt_style="v2pe")
    assert v.max_tiles_per_image == 5 and (v.new_tokens("counting-image"), v.new_tokens("reasoning-image")) == (320, 16)
    assert EvalSettings(deltas=[1.0], prompt_style="v2pe-1m").max_tiles_per_image == 12
    o = EvalSettings(deltas=[1.0], prompt_style="v2pe", max_tiles_per_image=2, max_new_tokens=7)
    assert o.max_tiles_per_image == 2 and o.new_tokens("counting-text") == 7 == o.new_tokens("retrieval-text")
    with pytest.raises(ValueError, match="--prompt-style 'nope' is not one of mmniah, v2pe, v2pe-1m"):
        EvalSettings(deltas=[1.0], prompt_style="nope")


def test_generation_stops_at_the_styles_budget(tok):
    """A model that never closes its answer gets the style's budget per task kind."""
    from v2pe_megatron.data.needles import synth_needles
    from v2pe_megatron.eval.runner import OracleBackend, score

    samples, _ = synth_needles([64], [0.5], tasks=("counting-text", "retrieval-text"),
                               count_tokens=lambda t: len(tok.encode(t)), image_tokens=4, image_fraction=0.0)
    calls = []

    class Chatty(OracleBackend):
        def answer_stats(self, batch):
            calls.append(1)
            return np.zeros(1), np.full(1, tok.encode("a")[-1])

    for style, want in (("mmniah", (32, 16)), ("v2pe", (320, 16))):
        settings = EvalSettings(deltas=[1.0], modes=("generate",), prompt_style=style)
        for s, n in zip(samples, want):
            p = prepare_sample(s, tok, None, image_size=56, num_image_token=4, max_tiles=1, use_thumbnail=True,
                               chat=ChatFormat(system=""), style=style)
            calls.clear()
            score(p, 1.0, Chatty(), tok, settings, pad_multiple=1)
            assert len(calls) == n, (style, s.task)


# ---------------------------------------------------------------------------------------------
# The system turn: the template's default, the same in training and evaluation
# ---------------------------------------------------------------------------------------------
def test_system_turn_default_is_internvls_in_training_and_eval(tok):
    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.data.chat import tokenize_sample

    assert chat_format(load_recipe(None).data) == ChatFormat("internlm2-chat", INTERNVL_SYSTEM_MESSAGE)
    assert chat_format(load_recipe(None, ["data.system_prompt=''"]).data).system == ""
    assert chat_format(load_recipe(None, ["data.system_prompt=Be brief."]).data).system == "Be brief."
    assert chat_format(load_recipe(None, ["data.template=plain"]).data).system == ""
    # the training loader's path (data.loader / data.synthetic call tokenize_sample with chat_format)
    conv = [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A cat."}]
    ids = tokenize_sample(tok, conversations=conv, chat=chat_format(load_recipe(None).data)).ids
    assert tok.decode(ids[1:]) == (f"<|im_start|>system\n{INTERNVL_SYSTEM_MESSAGE}<|im_end|><|im_start|>user\nWhat?"
                                   f"<|im_end|><|im_start|>assistant\nA cat.<|im_end|>")


def test_training_loader_emits_the_recipe_system_turn(tmp_path):
    """The loader itself (not only tokenize_sample) builds the system turn from the recipe."""
    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.data.loader import build_train_loader
    from v2pe_megatron.data.tokenizer import tiny_tokenizer

    meta = tmp_path / "meta.json"
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": 0, "conversations": [
        {"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A cat."}]}) + "\n")
    meta.write_text(json.dumps({"a": {"annotation": str(tmp_path / "a.jsonl"), "root": str(tmp_path)}}))
    tok = tiny_tokenizer()
    for system in ("", "Be brief."):
        r = load_recipe(None, ["model.preset=tiny", "data.seq_length=512", "data.dali_device=cpu",
                               f"data.meta_path={meta}", f"data.system_prompt='{system}'"])
        (batch,) = list(build_train_loader(r, dp_rank=0, dp_size=1, max_epochs=1, prefetch=0))
        text = tok.decode(t for t in batch.tokens[0].tolist() if t != tok.pad_id)
        assert ("<|im_start|>system\nBe brief.<|im_end|>" in text) == bool(system), text
        assert "<|im_start|>user\nWhat is it?<|im_end|>" in text


# ---------------------------------------------------------------------------------------------
# --trained-positions: the flag, else the checkpoint's recorded training length, else the recipe's
# ---------------------------------------------------------------------------------------------
def _checkpoint_with_yaml(folder: Path, seq_length):
    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.training.checkpointing import _write_model_yaml

    it = folder / "iter_0000010"
    it.mkdir(parents=True)
    (it / "metadata.json").write_text("{}")
    (folder / "latest").write_text("10")
    _write_model_yaml(it, load_recipe(ROOT / "recipes/tiny_cpu.yaml").model, seq_length)
    return it


def test_trained_positions_come_from_flag_checkpoint_or_recipe(tmp_path):
    from v2pe_megatron.cli.eval import trained_positions
    from v2pe_megatron.config import load_recipe
    from v2pe_megatron.training.checkpoint_files import recorded_seq_length

    recipe = load_recipe(ROOT / "recipes/tiny_cpu.yaml")
    it = _checkpoint_with_yaml(tmp_path / "run", 34000)
    assert recorded_seq_length(tmp_path / "run") == (34000, it / "model.yaml") == recorded_seq_length(it)
    # still a recipe file (export-hf, model checks): the model section as it was (its preset resolved)
    assert dataclasses.replace(load_recipe(it / "model.yaml").model, preset="tiny") == recipe.model
    assert trained_positions(None, recipe, str(tmp_path / "run")) == (
        34000, f"data.seq_length recorded in {it / 'model.yaml'}")
    assert trained_positions(1234, recipe, str(tmp_path / "run")) == (1234, "--trained-positions")
    assert trained_positions(None, recipe, None) == (256, "data.seq_length of the recipe")
    # v2pe-convert import-hf folders and older checkpoints record none: the recipe's, said so
    old = _checkpoint_with_yaml(tmp_path / "old", None)
    assert recorded_seq_length(old) is None and recorded_seq_length(tmp_path / "nothing") is None
    assert trained_positions(None, recipe, str(old)) == (256, "data.seq_length of the recipe (--ckpt records none)")


def test_choose_delta_says_where_the_trained_range_came_from(tmp_path, capsys):
    from v2pe_megatron.cli.eval import main

    it = _checkpoint_with_yaml(tmp_path / "run", 300)
    args = [str(ROOT / "recipes/tiny_cpu.yaml"), "--choose-delta", "--lengths", "64", "--tasks", "retrieval-text"]
    assert main(args + ["--ckpt", str(tmp_path / "run")]) == 0
    assert f"trained range 300 (data.seq_length recorded in {it / 'model.yaml'})" in capsys.readouterr().out
    assert main(args + ["--ckpt", str(tmp_path / "run"), "--trained-positions", "34000"]) == 0
    assert "trained range 34000 (--trained-positions)" in capsys.readouterr().out


def test_results_json_records_the_style_and_the_trained_range(tmp_path):
    from v2pe_megatron.eval.runner import summarize

    settings = EvalSettings(deltas=[1.0], prompt_style="v2pe", trained_positions=34000,
                            trained_positions_from="--trained-positions", out_dir=tmp_path)
    rep = summarize([], settings, [256], [0.0])
    got = json.loads(rep.results_json.read_text())
    assert {k: got[k] for k in ("prompt_style", "max_tiles_per_image", "max_new_tokens", "trained_positions",
                                "trained_positions_from")} == {
        "prompt_style": "v2pe", "max_tiles_per_image": 5, "max_new_tokens": None, "trained_positions": 34000,
        "trained_positions_from": "--trained-positions"}
