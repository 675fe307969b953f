"""Scoring one generated answer exactly as MM-NIAH's official scorer does (docs/eval.md, "Scoring rules").

The rule is ``is_correct`` of MM-NIAH's ``calculate_scores.py`` with ``VQAEval`` of its
``utils/tools.py`` (github.com/OpenGVLab/MM-NIAH at 2fd03dd), quirks included, because published
MM-NIAH tables were scored with it: a verdict that is "more reasonable" than the official one
makes our numbers incomparable. ``tests/eval/data/mmniah_verdicts.jsonl`` holds the official
verdicts on a few hundred (answer, response) rows and the tests check every one. Where the official
code raises (an answer of ``[]``, ``²`` as an option), the verdict is 0: its evaluation would stop
there, and 0 is what a crash-tolerant run of it records.

Three answer forms, as in MM-NIAH's files:

- ``int``: a 0-based option index (retrieval-image, reasoning-image);
- ``list``: counts (counting-text, counting-image), soft accuracy;
- ``str``: a word or phrase (retrieval-text, reasoning-text).

Teacher-forced scoring needs none of this: the answer's tokens are compared one by one.
"""

from __future__ import annotations

import json
import re
from typing import Any

from v2pe_megatron.data.needles import check_answer

# ---------------------------------------------------------------------------------------------
# VQAEval's normalization (the VQA challenge's answer processing, as MM-NIAH ships it)
# ---------------------------------------------------------------------------------------------
# Only these characters are punctuation; ':', "'", '*', '#', '%', '&', '|', '~', '$', '^' and all
# non-ASCII marks (“ ” 。 … « ») stay in the text. They still end a word for the ``\b`` search.
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# VQAEval's pattern is "(?!<=\d)(\.)(?!\d)": meant as a look-behind, written as a look-ahead that can
# never match at a '.', so it is "a full stop not followed by a digit". Such full stops are deleted
# (not spaced): "vase.bowl" becomes "vasebowl".
_FULL_STOP = re.compile(r"\.(?!\d)")
# VQAEval passes re.UNICODE as ``sub``'s third positional argument, which is ``count`` (32): only the
# first 32 such full stops of a text are deleted.
_FULL_STOP_COUNT = int(re.UNICODE)
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())} | {
    "thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90"}
_ARTICLES = {"a", "an", "the"}
# VQAEval's contraction map, applied word by word after lower-casing. Its mixed-case keys ("Im",
# "Ive", "Id've", "I'dve") can never match a lower-cased word and are left out; "somebody'd" ->
# "somebodyd" runs backwards in the original and is kept, since it decides verdicts.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def normalize(text: str) -> str:
    """VQAEval's normalization of an answer or a response (``processPunctuation`` then
    ``processDigitArticle``)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # A punctuation mark is deleted when it touches a space anywhere in the text ("ice-cream - yes":
    # every '-' goes, "icecream yes"), and every mark is deleted when the text holds a digit-comma-
    # digit anywhere ("1,000" -> "1000", but also "vase,bowl, 1,000" -> "vasebowl 1000"); otherwise the
    # mark becomes a space ("ice-cream" -> "ice cream"). Both tests look at the text as it came in.
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    text = text.translate({ord(p): "" if glued or f"{p} " in text or f" {p}" in text else " " for p in _PUNCT})
    text = _FULL_STOP.sub("", text, count=_FULL_STOP_COUNT)
    # Word by word (any Unicode space splits): number words to digits (zero ... twenty, then the
    # tens up to ninety; "twenty-one" is "20 1"), articles dropped, contractions completed.
    words = (_NUMBER_WORDS.get(w, w) for w in text.lower().split())
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _score_word(answer: str, response: str) -> float:
    # The whole normalized answer must sit between regex word boundaries in the normalized response.
    # Python's \b is Unicode-aware: “vase”, vase。, «vase» and #vase all match "vase", but "vase²"
    # does not ('²' is a word character), and an answer that starts or ends with a non-word character
    # ("$5", "50%") needs a word character on that side to match at all. An answer that normalizes to
    # nothing ("the") matches any response holding a word character and no other.
    want = re.escape(normalize(answer))
    return float(re.search(rf"\b{want}\b", normalize(response)) is not None)


def _score_option(answer: int, response: str) -> float:
    # A string of digits is the 0-based option index ("2", "02", "2." are option C). str.isdigit()
    # also accepts '²' or '①', which int() refuses: the official code raises there, the verdict is 0.
    if response.isdigit():
        return float(response.isdecimal() and int(response) == answer)
    r = response.lower().replace("the answer is", "").replace("*", "")  # "The answer is **C**"
    # Only the text before the first full stop counts ("C. a blue square"); commas are dropped only
    # then ("a, b. c" is "a b", two letters; "c," without a full stop stays two characters).
    if "." in r:
        r = r.split(".")[0].replace(",", "")
    r = r.strip()
    # A camera-motion subset of MM-NIAH answers in words: the phrase anywhere means option A / B.
    if "the camera is moving left" in r:
        r = "a"
    elif "the camera is moving right" in r:
        r = "b"
    if len(r) != 1:
        return 0.0
    # The letter's distance from 'a': "a" -> 0, "c" -> 2; any other single character is some other
    # (mostly negative or large) number and never an option.
    return float(ord(r) - ord("a") == answer)


def _score_counting(answer: list, response: str) -> float:
    # The response, with every "json" and "```" removed (a code fence, a bare "json" prefix, even a
    # "json" inside a key), must be a JSON document; anything else scores 0.
    text = response.replace("json", "").replace("```", "").strip()
    try:
        got = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, too many digits, nested too deep
        return 0.0
    if isinstance(got, dict):
        # A dict of lists is their concatenation; a dict holding anything else (a dict of plain
        # numbers) makes the official sum(..., start=[]) raise: 0.
        if not all(isinstance(v, list) for v in got.values()):
            return 0.0
        got = [x for v in got.values() for x in v]
    if not isinstance(got, list):
        return 0.0
    if not answer:  # the official code divides by zero here: 0
        return 0.0
    # Soft accuracy: entries equal at the same index over the answer's length; extra entries are
    # ignored. Python equality decides: 3.0 == 3 and true == 1 count, "3" == 3 does not.
    return sum(g == a for g, a in zip(got, answer)) / len(answer)


def score_response(answer: Any, response: str) -> float:
    """MM-NIAH's verdict for one generated ``response``: 1.0 / 0.0, or a soft accuracy in [0, 1]
    for a counting answer."""
    check_answer(answer)
    # Full stops around the response go first, whatever the answer's form: "[3, 7, 1]." parses,
    # "2." is an index, "vase." a word. Only full stops: "[3, 7, 1]. " keeps its stop and fails.
    response = response.strip(".")
    if isinstance(answer, int):
        return _score_option(answer, response)
    if isinstance(answer, list):
        return _score_counting(answer, response)
    return _score_word(answer, response)
