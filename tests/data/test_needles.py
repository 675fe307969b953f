"""Needle samples: the generated grid, needle placement, the MM-NIAH reader and prompt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from v2pe_megatron.data.needles import (CHOICE_INSTRUCTION, TASKS, WORD_INSTRUCTION, answer_text, prompt_of,
                                        read_mmniah, synth_needles, write_needles)
from v2pe_megatron.data.synthetic import draw_image, encode_image
from v2pe_megatron.data.tokenizer import tiny_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "mmniah_sample.jsonl"


def _count(tok):
    return lambda t: len(tok.encode(t))


def test_grid_is_complete_and_deterministic():
    tok = tiny_tokenizer()
    a, ima = synth_needles([200, 600], [0.0, 0.5, 1.0], count_tokens=_count(tok), image_tokens=4, seed=3)
    b, imb = synth_needles([200, 600], [0.0, 0.5, 1.0], count_tokens=_count(tok), image_tokens=4, seed=3)
    assert len(a) == len(TASKS) * 2 * 3
    assert {(s.task, s.target_length, s.target_depth) for s in a} == \
        {(t, n, d) for t in TASKS for n in (200, 600) for d in (0.0, 0.5, 1.0)}
    assert [(s.context, s.answer, s.images) for s in a] == [(s.context, s.answer, s.images) for s in b]
    assert ima == imb
    for s in a:
        text, names = prompt_of(s)  # placeholders and images agree
        assert text.count("<image>") == len(names)
        assert all(s.load_image(n) for n in names)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_text_needle_sits_at_its_depth_and_length_is_near_target(depth):
    tok = tiny_tokenizer()
    (s,), _ = synth_needles([2000], [depth], tasks=["retrieval-text"], count_tokens=_count(tok), image_tokens=16)
    needle = "The hidden object in this document is a"
    assert s.context.count(needle) == 1
    before = s.context[: s.context.index(needle)]
    n_img = before.count("<image>")
    at = len(tok.encode(before.replace("<image>", ""))) + 16 * n_img
    total = len(tok.encode(s.context.replace("<image>", ""))) + 16 * s.context.count("<image>")
    assert abs(at / total - depth) < 0.05, (at, total)
    assert abs(total - 2000) < 0.08 * 2000, total  # sentence granularity and tokenizer merges
    assert s.answer in s.context[s.context.index(needle):].split(".")[0]


def test_answers_match_the_needles():
    tok = tiny_tokenizer()
    samples, images = synth_needles([300], [0.3], count_tokens=_count(tok), image_tokens=4, seed=1)
    by = {s.task: s for s in samples}
    ct = by["counting-text"]
    found = [int(w) for w in ct.context.split() if w.isdigit()]
    assert found == ct.answer
    rt = by["reasoning-text"]
    assert f"{rt.answer} is taller than" in rt.context
    ri = by["retrieval-image"]
    assert ri.choices[ri.answer].endswith("circle") and answer_text(ri) == "ABCD"[ri.answer]
    rs = by["reasoning-image"]
    assert len(rs.choice_images) == 4 and isinstance(rs.answer, int)
    assert answer_text(by["counting-image"]) == json.dumps(by["counting-image"].answer)


def test_write_then_read_round_trip(tmp_path):
    tok = tiny_tokenizer()
    samples, images = synth_needles([150], [0.0, 1.0], count_tokens=_count(tok), image_tokens=4, seed=2)
    path = write_needles(tmp_path, samples, images)
    back = read_mmniah(path)
    assert [(s.id, s.task, s.context, s.question, s.answer, s.choices, s.target_length, s.target_depth)
            for s in back] == \
        [(s.id, s.task, s.context, s.question, s.answer, s.choices, s.target_length, s.target_depth)
         for s in samples]
    for s, r in zip(samples, back):
        assert [r.load_image(n) for n in prompt_of(r)[1]] == [s.load_image(n) for n in prompt_of(s)[1]]


def test_reads_mmniah_format(tmp_path):
    shutil.copy(FIXTURE, tmp_path / "retrieval-text_val.jsonl")
    for name, color in (("a.png", "red"), ("b.png", "blue")):
        (tmp_path / name).write_bytes(encode_image(draw_image(np.random.default_rng(0), 32, 32, color, "square"), "png"))
    samples = read_mmniah(tmp_path / "retrieval-text_val.jsonl")
    assert [s.task for s in samples] == ["retrieval-text"] * 4  # the file name names the task
    guessed = read_mmniah(FIXTURE, tmp_path)
    assert [s.task for s in guessed] == ["retrieval-text", "counting-text", "retrieval-image", "reasoning-image"]
    s0, s1, s2, s3 = guessed
    assert s0.context_length == 1023 and s0.depth == pytest.approx(0.45) and s1.depth == pytest.approx(0.5)
    text, names = prompt_of(s0)
    assert text.endswith("What is the hidden object?\n" + WORD_INSTRUCTION) and names == ["a.png", "b.png"]
    text, _ = prompt_of(s2)
    assert "\nA. a cat\nB. a dog\nC. a vase\nD. a lamp\n" + CHOICE_INSTRUCTION in text
    assert answer_text(s2) == "C" and answer_text(s1) == "[3, 5]"
    text, names = prompt_of(s3)  # option images come after the context's
    assert names == ["b.png", "a.png", "b.png"] and "\nA. <image>\nB. <image>\n" in text
    assert s3.load_image("a.png") == (tmp_path / "a.png").read_bytes()


def test_reader_errors_name_the_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"context": "c", "question": "q", "answer": "a"}\n{"context": "c"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: missing \['question', 'answer'\]"):
        read_mmniah(p)
    p.write_text('{"context": "c <image>", "question": "q", "answer": "a", "images_list": []}\n')
    with pytest.raises(ValueError, match="1 <image> placeholder"):
        prompt_of(read_mmniah(p)[0])
    # an answer of no MM-NIAH form is refused when the file is read, not when its response is scored
    for bad in ("1.5", "true", "null", '{"a": 1}'):
        p.write_text('{"context": "c", "question": "q", "answer": "a"}\n'
                     '{"context": "c", "question": "q", "answer": %s}\n' % bad)
        with pytest.raises(ValueError, match=r"x.jsonl:2: answer .* is not an MM-NIAH answer"):
            read_mmniah(p)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        synth_needles([100], [0.5], tasks=["retrieval-audio"])
    with pytest.raises(ValueError, match="depths"):
        synth_needles([100], [1.5])


SCHEMA = Path(__file__).parent / "fixtures" / "mmniah_schema.json"
_JSON_TYPES = {"int": int, "str": str, "list": list, "float": float, "null": type(None)}


def _is(value, names) -> bool:
    return any(type(value) is _JSON_TYPES[n] for n in names)  # bool is no int here


def test_generated_lines_carry_mmniah_schema_field_by_field(tmp_path):
    """Every field of MM-NIAH's data format, with its type, on every generated line, in MM-NIAH's
    layout (annotations/<task>.jsonl, images/ as the root of every image path)."""
    schema = json.loads(SCHEMA.read_text())
    tok = tiny_tokenizer()
    samples, images = synth_needles([150, 300], [0.0, 0.6], count_tokens=_count(tok), image_tokens=4, seed=5)
    root = write_needles(tmp_path / "mm_niah_val", samples, images)
    assert sorted(p.name for p in (root / "annotations").iterdir()) == sorted(f"{t}.jsonl" for t in TASKS)
    for task in TASKS:
        lines = [json.loads(x) for x in (root / "annotations" / f"{task}.jsonl").read_text().splitlines()]
        assert [x["id"] for x in lines] == list(range(len(lines)))  # ints from 0, per task
        for x in lines:
            for k, types in schema["line"].items():
                assert _is(x[k], types), (task, k, x[k])
            for k, types in schema["meta"].items():
                assert k in x["meta"] and _is(x["meta"][k], types), (task, k, x["meta"].get(k))
            m = x["meta"]
            assert type(x["answer"]).__name__ == schema["answer_by_task"][task]
            for opt in ("choices", "choices_image_path"):
                assert (m[opt] is not None) == (schema["options_by_task"].get(task) == opt), (task, opt)
            # NOTE 1 of the format: placeholders in context and question = images_list
            assert x["context"].count("<image>") + x["question"].count("<image>") == len(x["images_list"])
            assert m["num_images"] == len(x["images_list"])
            assert m["context_length"] == m["context_length_text"] + m["context_length_image"] > 0
            assert len(m["needles"]) == len(m["placed_depth"]) >= 1
            for needle in m["needles"]:  # a text needle is in the context, an image needle is an image path
                assert needle in x["context"] or (needle in x["images_list"] and (root / "images" / needle).is_file())
            assert all((root / "images" / p).is_file() for p in x["images_list"] + (m["choices_image_path"] or []))
    back = read_mmniah(root)  # the split folder as MM-NIAH ships it
    assert [(s.id, s.task, s.answer, s.qid) for s in back] == [(s.id, s.task, s.answer, s.qid) for s in samples]
    assert back[0].load_image(back[0].images[0]) == images[back[0].images[0]]
    assert read_mmniah(root / "annotations" / "counting-image.jsonl")[0].load_image  # one file: root found too


def test_the_task_and_answer_form_come_from_the_line(tmp_path):
    """A counting file whose name lacks the task, its answers stored as strings: still list answers."""
    line = {"id": 0, "images_list": [], "context": "The little penguin counted 3 needles.", "question": "How many?",
            "answer": "[3, 5]", "meta": {"placed_depth": [0.1, 0.9], "context_length": 1500, "choices": None,
                                         "choices_image_path": None}}
    f = tmp_path / "my_file.jsonl"
    f.write_text(json.dumps(line) + "\n")
    (s,) = read_mmniah(f)
    assert s.task == "counting-text" and s.answer == [3, 5] and s.qid == 0 and s.placed_depth == [0.1, 0.9]
    f.write_text(json.dumps({**line, "meta": {**line["meta"], "placed_depth": 1.5}}) + "\n")
    with pytest.raises(ValueError, match="placed_depth 1.5 must lie in"):
        read_mmniah(f)


# ---------------------------------------------------------------------------------------------
# The training split (v2pe-data synth --needles --split train): disjoint from every eval set
# ---------------------------------------------------------------------------------------------
def _needle_content(samples, images):
    """What an evaluation sample could leak into training: needle sentences, needle image pixels,
    (question, answer) pairs and the text options. (The option images of reasoning-image, plain
    squares of the four colours, are the legend both splits share, like the colour words.)"""
    texts = {n for s in samples for n in s.needles if not n.endswith(".png")}
    pixels = {images[n] for s in samples for n in s.needles if n.endswith(".png")}
    qa = {(s.question, json.dumps(s.answer)) for s in samples}
    options = {c for s in samples for c in (s.choices or [])}
    return texts, pixels, qa, options


def test_training_split_shares_no_needle_with_any_eval_set():
    from v2pe_megatron.data.needles import SPLITS

    tok = tiny_tokenizer()
    ev, tr = SPLITS["eval"], SPLITS["train"]
    assert not set(ev.objects) & set(tr.objects) and not set(ev.names) & set(tr.names)
    assert (ev.counter, ev.things, ev.needle_shape, ev.dot_color) != (tr.counter, tr.things, tr.needle_shape,
                                                                    tr.dot_color)
    for seed in (0, 1, 2):  # the same seed number in both splits: unrelated streams, disjoint needles
        e = _needle_content(*synth_needles([120, 300], [0.0, 0.5, 1.0], count_tokens=_count(tok), image_tokens=4,
                                           seed=seed, samples_per_cell=2))
        t = _needle_content(*synth_needles([120, 300], [0.0, 0.5, 1.0], count_tokens=_count(tok), image_tokens=4,
                                           seed=seed, samples_per_cell=2, split="train"))
        assert all(e_part and t_part for e_part, t_part in zip(e, t))  # every kind of content was generated
        for what, e_part, t_part in zip(("needle texts", "needle images", "questions+answers", "options"), e, t):
            assert not e_part & t_part, f"seed {seed}: {what} shared by the eval and train splits"


def test_eval_split_is_unchanged_by_the_split_argument():
    tok = tiny_tokenizer()
    a, ia = synth_needles([150], [0.5], count_tokens=_count(tok), image_tokens=4, seed=5)
    b, ib = synth_needles([150], [0.5], count_tokens=_count(tok), image_tokens=4, seed=5, split="eval")
    assert [(s.context, s.answer) for s in a] == [(s.context, s.answer) for s in b] and ia == ib
    assert a[0].needles == ["The hidden object in this document is a " + a[0].answer + "."]
    with pytest.raises(ValueError, match="split"):
        synth_needles([150], [0.5], split="test")


def test_training_records_train_the_answer_only():
    from v2pe_megatron.data.chat import tokenize_sample
    from v2pe_megatron.data.needles import training_records

    tok = tiny_tokenizer()
    samples, _ = synth_needles([150], [0.5], count_tokens=_count(tok), image_tokens=4, seed=1, split="train")
    for s, rec in zip(samples, training_records(samples)):
        text, images = prompt_of(s)
        assert rec["conversations"][0]["value"] == text and rec.get("image", []) == images
        tk = tokenize_sample(tok, conversations=rec["conversations"], tiles_per_image=[1] * len(images),
                             num_image_token=4)
        trained = tok.decode(tk.ids[tk.target.astype(bool)].tolist())
        assert trained.replace("<|im_end|>", "").strip() == answer_text(s), s.id
