"""Scoring one answer, MM-NIAH's rules (docs/eval.md):

- option questions (int answer): the response's first letter, after "the answer is" and markdown
  stars are stripped, must be the option's letter;
- counting (list answer): the response parsed as a JSON list, soft accuracy = matching entries at
  the same index / len(answer);
- word answers (str): the normalized answer (lower case, punctuation and articles removed, number
  words as digits) must appear as a whole word sequence in the normalized response.

Teacher-forced scoring needs none of this: the answer's tokens are compared one by one.
"""

from __future__ import annotations

import json
import re
from typing import Any

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\->@`,?!<:*']")


def normalize(text: str) -> str:
    text = _PUNCT.sub(" ", text.replace("\n", " ").replace("\t", " ").lower())
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # full stops, not decimal points
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def _option(response: str) -> str:
    r = response.strip().strip(".").lower().replace("the answer is", "").replace("*", "").strip()
    if "." in r:
        r = r.split(".")[0].strip()
    return r


def score_response(answer: Any, response: str) -> float:
    """1.0 / 0.0 (soft accuracy in [0, 1] for counting) for one generated ``response``."""
    if isinstance(answer, bool):
        raise ValueError("a boolean answer is not an MM-NIAH answer")
    if isinstance(answer, int):
        r = _option(response)
        return float(len(r) == 1 and ord(r) - ord("a") == answer)
    if isinstance(answer, list):
        r = response.strip().replace("```json", "").replace("```", "").strip()
        try:
            got = json.loads(r)
        except (json.JSONDecodeError, ValueError):
            return 0.0
        if isinstance(got, dict):
            got = [x for v in got.values() for x in (v if isinstance(v, list) else [v])]
        if not isinstance(got, list) or not answer:
            return 0.0
        return sum(g == a for g, a in zip(got, answer)) / len(answer)
    want, got = normalize(str(answer)), normalize(response)
    if not want:
        return float(not got)
    return float(re.search(rf"(?:^| ){re.escape(want)}(?: |$)", got) is not None)
