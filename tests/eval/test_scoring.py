"""MM-NIAH's answer rules: options, counting lists, words."""

from __future__ import annotations

import pytest

from v2pe_megatron.eval.scoring import normalize, score_response


@pytest.mark.parametrize("answer,response,expected", [
    ("vase", "vase", 1.0),
    ("vase", "The hidden object is a Vase.", 1.0),
    ("vase", "vases", 0.0),                      # whole words only
    ("oak", "a book", 0.0),
    ("ice cream", "It was ice-cream!", 1.0),      # punctuation splits like a space
    ("3", "three", 1.0),                          # number words
    (2, "C", 1.0),
    (2, "c.", 1.0),
    (2, "The answer is **C**", 1.0),
    (2, "B", 0.0),
    (0, "A. a red circle", 1.0),
    (0, "AB", 0.0),
    ([3, 5, 1], "[3, 5, 1]", 1.0),
    ([3, 5, 1], "```json\n[3, 5, 2]\n```", pytest.approx(2 / 3)),
    ([3, 5], "[5, 3]", 0.0),
    ([3, 5], "[3]", 0.5),
    ([3, 5], "3 and 5", 0.0),                    # not a list
    ([3, 5], '{"a": [3], "b": [5]}', 1.0),
])
def test_score_response(answer, response, expected):
    assert score_response(answer, response) == expected


def test_normalize():
    assert normalize("The  Answer, is: an Oak.") == "answer is oak"
    assert normalize("3.5 apples") == "3.5 apples"


def test_boolean_answer_is_refused():
    with pytest.raises(ValueError, match="boolean"):
        score_response(True, "yes")
