"""MM-NIAH's answer rules: every verdict equals the official scorer's on a table of recorded rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from v2pe_megatron.eval.scoring import normalize, score_response

TABLE = Path(__file__).parent / "data" / "mmniah_verdicts.jsonl"
KINDS = {"retrieval-text", "retrieval-image", "counting-text", "counting-image", "reasoning-text", "reasoning-image"}


def _table() -> tuple[dict, list[dict]]:
    lines = [json.loads(line) for line in TABLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[0]["header"], lines[1:]


def test_table_is_the_official_scorers_and_covers_every_kind():
    header, rows = _table()
    assert header["official"]["repo"] == "github.com/OpenGVLab/MM-NIAH"
    assert re.fullmatch(r"[0-9a-f]{40}", header["official"]["commit"])
    assert len(rows) >= 200
    assert {r["kind"] for r in rows} == KINDS
    # The answer forms the scorer tells apart, each with right and wrong responses.
    for form in (int, list, str):
        verdicts = {r["verdict"] for r in rows if type(r["answer"]) is form}
        assert {0.0, 1.0} <= verdicts, form
    # A soft counting score and the official code's crashes are in the table.
    assert any(0.0 < r["verdict"] < 1.0 for r in rows)
    assert any(r["official_raised"] for r in rows)


def test_every_verdict_equals_the_official_scorers():
    _, rows = _table()
    wrong = []
    for i, r in enumerate(rows, 2):  # line numbers in the file (the header is line 1)
        try:
            got = score_response(r["answer"], r["response"])
        except Exception as e:  # a scorer that raises on a model's response is wrong too: listed
            got = f"{type(e).__name__}: {e}"
        if got != r["verdict"]:
            wrong.append(f"line {i} [{r['kind']}] answer={r['answer']!r} response={r['response'][:80]!r}: "
                         f"got {got}, official {r['verdict']} ({r['note']})")
    assert not wrong, f"{len(wrong)} of {len(rows)} verdicts differ from MM-NIAH's:\n" + "\n".join(wrong)


@pytest.mark.parametrize("answer,response,expected", [
    ("vase", "vase", 1.0),
    ("vase", "The hidden object is a Vase.", 1.0),
    ("vase", "vases", 0.0),                      # whole words only
    ("oak", "a book", 0.0),
    ("ice cream", "It was ice-cream!", 1.0),      # a hyphen away from spaces splits like a space
    ("3", "three", 1.0),                          # number words
    (2, "C", 1.0),
    (2, "c.", 1.0),
    (2, "The answer is **C**", 1.0),
    (2, "B", 0.0),
    (2, "2", 1.0),                                # a digit is the 0-based option index
    (0, "A. a red circle", 1.0),
    (0, "AB", 0.0),
    ([3, 5, 1], "[3, 5, 1]", 1.0),
    ([3, 5, 1], "```json\n[3, 5, 2]\n```", pytest.approx(2 / 3)),
    ([3, 5], "[5, 3]", 0.0),
    ([3, 5], "[3]", 0.5),
    ([3, 5], "3 and 5", 0.0),                    # not a list
    ([3, 5], '{"a": [3], "b": [5]}', 1.0),
    ([3, 5], '{"a": 3, "b": 5}', 0.0),           # a dict of numbers is no list of counts
])
def test_score_response(answer, response, expected):
    assert score_response(answer, response) == expected


def test_normalize():
    # ", " next to a space: the comma goes; ':' is not in VQAEval's punctuation list and stays.
    assert normalize("The  Answer, is: an Oak.") == "answer is: oak"
    assert normalize("3.5 apples") == "3.5 apples"
    assert normalize("Thirty-one dont") == "30 1 don't"


@pytest.mark.parametrize("answer", [True, 3.5, None, {"a": 1}])
def test_answer_that_is_no_mmniah_answer_is_refused(answer):
    with pytest.raises(ValueError, match="not an MM-NIAH answer"):
        score_response(answer, "yes")
