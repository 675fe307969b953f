"""Needles in long multimodal haystacks, in MM-NIAH's format (docs/eval.md).

A sample is a long interleaved document (``context``: text with ``<image>`` placeholders, the images
in ``images_list``), a ``question`` and an ``answer``; ``meta`` holds ``context_length``,
``placed_depth`` (the needles' depths, fractions of the context), ``choices`` (text options) or
``choices_image_path`` (image options). The six task kinds are MM-NIAH's:

| task | needle | answer |
|---|---|---|
| retrieval-text | a sentence naming a hidden object | the object (a word) |
| counting-text | 2-4 sentences "The little penguin counted N needles." | the list of N, in order |
| reasoning-text | two comparisons (A taller than B, B taller than C) | the tallest name |
| retrieval-image | one image of a coloured circle among noisy squares | the option letter of its description |
| counting-image | 2-3 images with N red dots each | the list of N, in order |
| reasoning-image | one image of a coloured circle | the option image of the same colour |

The same reader serves MM-NIAH's own jsonl files and split folders as it ships them
(:func:`read_mmniah`: ``mm_niah_<split>/annotations/<task>.jsonl`` + ``images/``) and the sets
:func:`write_needles` generates in that layout, every field of MM-NIAH's schema filled
(``v2pe-data synth OUT --needles``); :func:`prompt_of` builds the user turn the way an evaluation
:class:`PromptStyle` does (MM-NIAH's InternVL evaluation by default: context, question, options,
instruction) and :func:`answer_text` the text a model should answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from v2pe_megatron.data.synthetic import COLORS, _haystack, draw_image, encode_image

TASKS = ("retrieval-text", "counting-text", "reasoning-text", "retrieval-image", "counting-image",
         "reasoning-image")
IMAGE = "<image>"
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
WORD_INSTRUCTION = "Answer the question using a single word or phrase."

Answer = Union[str, int, list]

_OBJECTS = ("oak", "book", "vase", "lamp", "kettle", "violin", "anchor", "candle", "mirror", "compass")
_NAMES = ("Alice", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo")
_CIRCLE_COLORS = ("red", "green", "blue", "yellow")


@dataclass(frozen=True)
class NeedleVocab:
    """What a split's needles are made of. The ``train`` split shares nothing with ``eval`` that a
    needle, a question or a needle image could repeat (other objects, names, counting sentences, dot
    colour and needle shape; tests/data/test_needles.py checks it on generated sets), but the same
    colour words and counts, so that what training teaches (copy the hidden word, read a colour or
    a count) is what evaluation asks."""

    objects: tuple[str, ...]
    names: tuple[str, ...]
    counter: str            # "The little <counter> counted N <things>."
    things: str
    needle_shape: str       # the image needle's shape (distractors are noisy squares)
    dot_color: str          # counting-image dots
    seed_tag: int           # mixed into the seed: the same --seed gives unrelated streams per split


SPLITS: dict[str, NeedleVocab] = {
    "eval": NeedleVocab(_OBJECTS, _NAMES, "penguin", "needles", "circle", "red", 0),
    "train": NeedleVocab(
        ("pebble", "ladder", "basket", "bucket", "helmet", "trumpet", "saddle", "pillow", "teapot", "lantern",
         "wallet", "hammer", "bottle", "carpet", "feather", "ribbon", "blanket", "whistle", "scarf", "barrel",
         "kite", "drum", "rope", "shovel", "spoon", "cradle", "banner", "goblet", "harp", "sword"),
        ("Ivan", "Julia", "Karim", "Lena", "Marco", "Nadia", "Oscar", "Paula", "Quentin", "Rosa", "Sven", "Tara"),
        # black dots: a one-dot image of a circle colour would be pixel for pixel an eval circle needle
        "fox", "stones", "diamond", "black", 0x7472),
}


@dataclass
class NeedleSample:
    id: str                           # unique in a run: ``<task>/<qid>`` (MM-NIAH's ids restart per task)
    task: str
    context: str                      # with one ``<image>`` per entry of ``images``
    question: str
    answer: Answer                    # str (word), int (option index) or list (counting)
    images: list[str] = field(default_factory=list)
    choices: Optional[list[str]] = None
    choice_images: Optional[list[str]] = None
    context_length: int = 0           # meta.context_length: text + image tokens as the file's writer counted them
    depths: list[float] = field(default_factory=list)   # the needles' depths in [0, 1]
    target_length: Optional[int] = None  # the grid cell's length (generated data)
    target_depth: Optional[float] = None  # the grid cell's depth (generated data)
    load_image: Optional[Callable[[str], bytes]] = field(default=None, repr=False)
    qid: Union[int, str, None] = None  # MM-NIAH's ``id`` (an int from 0 per task), the result files' question_id
    placed_depth: Any = None          # meta.placed_depth as the file holds it (a float or a list)
    needles: list[str] = field(default_factory=list)   # meta.needles: needle texts / needle image paths
    context_length_text: int = 0      # meta.context_length_text
    context_length_image: int = 0     # meta.context_length_image

    @property
    def depth(self) -> float:
        """The depth the sample is binned by: the cell's, else the needles' mean (MM-NIAH's rule)."""
        if self.target_depth is not None:
            return float(self.target_depth)
        return float(np.mean(self.depths)) if self.depths else 0.0


@dataclass(frozen=True)
class PromptStyle:
    """How an evaluation asks: the user turn's layout and the budgets it runs with (docs/eval.md).
    The system turn is the chat template's (``data.system_prompt``); both references use InternVL's."""

    name: str
    context_sep: str            # between the context and the question
    counting_instruction: bool  # WORD_INSTRUCTION after a counting question (a list answer) too
    strip: bool                 # the user turn stripped of surrounding whitespace
    max_tiles: int              # tiles per image (InternVL's dynamic tiling up to this many)
    new_tokens_counting: int    # greedy budget of a counting task
    new_tokens_other: int       # ... of every other task
    reference: str              # where the rule comes from

    def new_tokens(self, task: str) -> int:
        # both references test the task name: ``'counting' in task``
        return self.new_tokens_counting if "counting" in task else self.new_tokens_other


PROMPT_STYLES: dict[str, PromptStyle] = {s.name: s for s in (
    # MM-NIAH's eval_internvl.py: qs = f'{context}\n{question}', load_image(dynamic_image_size=False)
    # (one 448 px tile per image), max_new_tokens=32 if 'counting' in task else 16.
    PromptStyle("mmniah", "\n", True, False, 1, 32, 16,
                "OpenGVLab/MM-NIAH@2fd03ddcf0fa9f028963af3de1eea3b538a4314a eval_internvl.py, utils/tools.py"),
    # V2PE's eval/mm_niah/eval_mm_niah.py: qs = f'{context}{question}', its get_input has the counting
    # instruction commented out, load_image(dynamic_image_size=True, max_num=5) (+ thumbnail),
    # max_new_tokens=320 if 'counting' in task else 16.
    PromptStyle("v2pe", "", False, False, 5, 320, 16,
                "OpenGVLab/V2PE@f96f18990e88f511ca0502b92fc30d8708ba3ada eval/mm_niah/eval_mm_niah.py, tools.py"),
    # V2PE's MM-NIAH-1M script eval/mm_niah/eval_mm_niah_long.py (its own data files, teacher-forced):
    # the same query built through the training preprocess (preprocess_internlm strips each turn),
    # load_image(..., max_num=12).
    PromptStyle("v2pe-1m", "", False, True, 12, 320, 16,
                "OpenGVLab/V2PE@f96f18990e88f511ca0502b92fc30d8708ba3ada eval/mm_niah/eval_mm_niah_long.py"),
)}


def prompt_of(s: NeedleSample, style: str | PromptStyle = "mmniah") -> tuple[str, list[str]]:
    """(user turn with ``<image>`` placeholders, the images in placeholder order), as ``style`` asks
    (:data:`PROMPT_STYLES`; default MM-NIAH's)."""
    st = style if isinstance(style, PromptStyle) else PROMPT_STYLES[style]
    question, images = s.question, list(s.images)
    if s.choices:
        question += "".join(f"\n{chr(ord('A') + k)}. {c}" for k, c in enumerate(s.choices))
        question += "\n" + CHOICE_INSTRUCTION
    elif s.choice_images:
        question += "".join(f"\n{chr(ord('A') + k)}. {IMAGE}" for k in range(len(s.choice_images)))
        images += list(s.choice_images)
        question += "\n" + CHOICE_INSTRUCTION
    elif not isinstance(s.answer, list) or st.counting_instruction:  # the references test the answer's form
        question += "\n" + WORD_INSTRUCTION
    text = f"{s.context}{st.context_sep}{question}"
    if st.strip:
        text = text.strip()
    if text.count(IMAGE) != len(images):
        raise ValueError(f"sample {s.id}: {text.count(IMAGE)} <image> placeholder(s) for {len(images)} image(s)")
    return text, images


def check_answer(answer: Any) -> None:
    """Refuse an answer of no MM-NIAH form, so that a data set can be checked before a run. The
    official code would score a float or null answer 0 by crashing and ``true`` as option 1."""
    if isinstance(answer, bool) or not isinstance(answer, (int, list, str)):
        raise ValueError(f"answer {answer!r}: a {type(answer).__name__} is not an MM-NIAH answer "
                         f"(an int option index, a list of counts or a str)")


def answer_text(s: NeedleSample) -> str:
    """What a perfect model answers: the option letter, the JSON list, or the word."""
    try:
        check_answer(s.answer)
    except ValueError as e:
        raise ValueError(f"sample {s.id}: {e}") from None
    if isinstance(s.answer, int):
        return chr(ord("A") + s.answer)
    if isinstance(s.answer, list):
        return json.dumps(s.answer)
    return str(s.answer)


# ---------------------------------------------------------------------------------------------
# MM-NIAH's jsonl
# ---------------------------------------------------------------------------------------------
def _task_from_name(path: Path) -> Optional[str]:
    # longest first: no task name is part of another today, but a file name may hold text around it
    return next((t for t in sorted(TASKS, key=len, reverse=True) if t in path.name), None)


def _list_answer(answer: Any) -> Optional[list]:
    """The answer as a list when it is one, or a string holding a JSON list (some MM-NIAH counting
    files store ``"[3, 5]"``), else None."""
    if isinstance(answer, list):
        return answer
    if isinstance(answer, str) and answer.strip().startswith("["):
        try:
            v = json.loads(answer)
        except json.JSONDecodeError:
            return None
        return v if isinstance(v, list) else None
    return None


def _guess_task(obj: dict[str, Any]) -> str:
    """The last resort: option images / option texts / a list answer / a word. MM-NIAH's documents
    all hold images, so counting-image and reasoning-text cannot be told from counting-text and
    retrieval-text by the line alone (the verdict rule is the same for each pair: it follows the
    answer's form); MM-NIAH's own files carry the task in their name (``annotations/<task>.jsonl``)."""
    meta = obj.get("meta") or {}
    if meta.get("choices_image_path"):
        return "reasoning-image"
    if meta.get("choices"):
        return "retrieval-image"
    if _list_answer(obj.get("answer")) is not None:
        return "counting-text"
    return "retrieval-text"


def split_of(path: str | Path) -> Optional[str]:
    """MM-NIAH's split (``val``, ``test``, ...) of a path inside an ``mm_niah_<split>`` folder, else None."""
    for part in reversed(Path(path).resolve().parts):
        if part.startswith("mm_niah_") and len(part) > len("mm_niah_"):
            return part[len("mm_niah_"):]
    return None


def annotation_files(folder: str | Path) -> list[Path]:
    """The annotation files of an MM-NIAH split folder as shipped (``annotations/<task>.jsonl``, the
    images in ``images/``), in :data:`TASKS` order, then any others by name."""
    ann = Path(folder) / "annotations"
    files = sorted(ann.glob("*.jsonl"))
    if not files:
        raise ValueError(f"{folder}: no annotations/*.jsonl (MM-NIAH's layout: "
                         f"mm_niah_<split>/annotations/<task>.jsonl and mm_niah_<split>/images/)")
    rank = {t: k for k, t in enumerate(TASKS)}
    return sorted(files, key=lambda f: (rank.get(f.stem, len(TASKS)), f.name))


def default_image_root(path: str | Path) -> Path:
    """Where a file's image paths are relative to: ``<split>/images`` for ``<split>/annotations/X.jsonl``
    (MM-NIAH's layout, ``v2pe-data synth --needles``), else the file's own folder."""
    p = Path(path)
    if p.parent.name == "annotations" and (p.parent.parent / "images").is_dir():
        return p.parent.parent / "images"
    return p.parent


def read_mmniah(path: str | Path, image_root: str | Path | None = None, task: Optional[str] = None
                ) -> list[NeedleSample]:
    """Samples of an MM-NIAH jsonl file, or of every ``annotations/*.jsonl`` of a split folder as
    MM-NIAH ships it. The task comes from ``task``, else ``meta.task``, else the file name
    (``annotations/<task>.jsonl``), else the answer's form; a list answer (or a string holding one)
    stays a list whatever the file is called. Image paths resolve against ``image_root`` (default:
    :func:`default_image_root`). Bad lines raise with the line number and the field at fault."""
    p = Path(path)
    if p.is_dir():
        out = []
        for f in annotation_files(p):
            out += read_mmniah(f, image_root if image_root is not None else p / "images", task)
        return out
    root = Path(image_root) if image_root is not None else default_image_root(p)
    from_name = _task_from_name(p)
    out = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: not JSON ({e})") from e
            missing = [k for k in ("context", "question", "answer") if k not in obj]
            if missing:
                raise ValueError(f"{p}:{lineno}: missing {missing} (MM-NIAH lines have images_list, context, "
                                 f"question, answer, meta)")
            meta = obj.get("meta") or {}
            t = task or meta.get("task") or from_name or _guess_task(obj)
            if t not in TASKS:
                raise ValueError(f"{p}:{lineno}: task {t!r} is not one of {TASKS}")
            answer = obj["answer"]
            try:  # here, not mid-run: the scorer would meet it only after hours of generation
                check_answer(answer)
            except ValueError as e:
                raise ValueError(f"{p}:{lineno}: {e}") from None
            as_list = _list_answer(answer)
            if as_list is not None:
                answer = as_list
            elif t.startswith("counting"):
                raise ValueError(f"{p}:{lineno}: answer {answer!r} of a {t} line is not a list")
            raw_depth = meta.get("placed_depth", [])
            depths = [float(x) for x in (raw_depth if isinstance(raw_depth, list) else [raw_depth])]
            if any(not 0.0 <= d <= 1.0 for d in depths):
                raise ValueError(f"{p}:{lineno}: meta.placed_depth {raw_depth!r} must lie in [0, 1]")
            qid = obj.get("id", lineno - 1)

            def load(name: str, _root=root) -> bytes:
                return (_root / name).read_bytes()

            out.append(NeedleSample(
                id=f"{t}/{qid}", task=t, context=obj["context"],
                question=obj["question"], answer=answer, images=list(obj.get("images_list") or []),
                choices=meta.get("choices"), choice_images=meta.get("choices_image_path"),
                context_length=int(meta.get("context_length", 0)), depths=depths,
                target_length=meta.get("target_length"), target_depth=meta.get("target_depth"), load_image=load,
                qid=qid, placed_depth=raw_depth, needles=list(meta.get("needles") or []),
                context_length_text=int(meta.get("context_length_text", 0)),
                context_length_image=int(meta.get("context_length_image", 0))))
    if not out:
        raise ValueError(f"{p}: no samples")
    return out


def to_record(s: NeedleSample) -> dict[str, Any]:
    """The MM-NIAH jsonl line of a sample: every field of MM-NIAH's schema (its README's data format:
    int ``id``, ``meta.needles``, ``num_images``, the three context lengths, ``choices`` and
    ``choices_image_path`` present, None where the task has none), plus ``meta.task``,
    ``target_length`` and ``target_depth`` (MM-NIAH's readers ignore them)."""
    return {"id": s.qid if s.qid is not None else s.id, "images_list": list(s.images), "context": s.context,
            "question": s.question, "answer": s.answer,
            "meta": {"placed_depth": s.placed_depth if s.placed_depth is not None else list(s.depths),
                     "context_length": int(s.context_length),
                     "context_length_text": int(s.context_length_text),
                     "context_length_image": int(s.context_length_image),
                     "num_images": len(s.images), "needles": list(s.needles),
                     "choices": s.choices, "choices_image_path": s.choice_images,
                     "task": s.task, "target_length": s.target_length, "target_depth": s.target_depth}}


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
def draw_dots(rng: np.random.Generator, side: int, n: int, color: str = "red") -> np.ndarray:
    """A white square image with ``n`` dots of ``color`` on a grid (counting-image needles)."""
    img = np.full((side, side, 3), 245, np.float32)
    k = int(np.ceil(np.sqrt(max(n, 1))))
    cell = side / k
    yy, xx = np.mgrid[0:side, 0:side]
    for j in rng.permutation(k * k)[:n]:
        cy, cx = (j // k + 0.5) * cell, (j % k + 0.5) * cell
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= (cell * 0.3) ** 2] = COLORS[color]
    return img.astype(np.uint8)


class _Writer:
    """Builds one document of about ``target`` tokens: haystack sentences, distractor images and
    needles (text or image) at given depths."""

    def __init__(self, rng: np.random.Generator, count_tokens: Callable[[str], int], image_tokens: int,
                 image_fraction: float, images: dict[str, bytes], distractors: list[str], side: int) -> None:
        self.rng, self.count, self.image_tokens = rng, count_tokens, image_tokens
        self.image_fraction, self.images, self.distractors, self.side = image_fraction, images, distractors, side
        pool = _haystack(rng, 800)
        self.pool = [(s, count_tokens(" " + s)) for s in pool]

    def new_image(self, arr: np.ndarray) -> str:
        name = f"needle_{len(self.images):06d}.png"
        self.images[name] = encode_image(arr, "png")
        return name

    def document(self, target: int, needles: Sequence[tuple[float, str, Optional[str]]]
                 ) -> tuple[str, list[str], int, list[float], int]:
        """(context, images, tokens, needle depths, image tokens). ``needles``: (depth, text, image name
        or None)."""
        rng = self.rng
        fixed = sum(self.count(" " + t) if t else 0 for _, t, _ in needles)
        fixed += sum(self.image_tokens for _, _, im in needles if im)
        n_img = int(round(target * self.image_fraction / max(self.image_tokens, 1)))
        text_budget = max(0, target - fixed - n_img * self.image_tokens)
        parts: list[tuple[str, int, Optional[str]]] = []   # (text, tokens, image)
        used = 0
        while used < text_budget:
            s, n = self.pool[int(rng.integers(len(self.pool)))]
            parts.append((s, n, None))
            used += n
        for _ in range(n_img):
            parts.insert(int(rng.integers(0, len(parts) + 1)), (IMAGE, self.image_tokens,
                                                                 self.distractors[int(rng.integers(len(self.distractors)))]))
        # Needles go where their depth falls in the running token count, deepest first so that the
        # earlier insertions do not shift the later ones' offsets.
        cum = np.concatenate([[0], np.cumsum([n for _, n, _ in parts])])
        total = int(cum[-1]) + fixed
        at = []
        for order, (depth, text, im) in enumerate(needles):
            k = int(np.searchsorted(cum, depth * cum[-1], side="left"))
            at.append((min(k, len(parts)), order, text, im))
        # At equal offsets the later needle goes in first, so the needles keep their order.
        for k, _, text, im in sorted(at, key=lambda a: (-a[0], -a[1])):
            items = [(IMAGE, self.image_tokens, im)] if im else []
            items += [(text, self.count(" " + text), None)] if text else []
            parts[k:k] = items
        context = " ".join(t for t, _, _ in parts)
        imgs = [im for t, _, im in parts if im is not None]
        cum = np.cumsum([0] + [n for _, n, _ in parts])
        depths = []
        for k, (t, _, im) in enumerate(parts):
            if (im is not None and im not in self.distractors) or any(t == text for _, text, _ in needles if text):
                depths.append(round(float(cum[k] / max(total, 1)), 4))
        return context, imgs, total, depths, len(imgs) * self.image_tokens


def _task_sample(w: _Writer, task: str, target: int, depth: float, qid: int,
                 v: NeedleVocab = SPLITS["eval"]) -> NeedleSample:
    rng = w.rng
    # Multi-needle tasks: the first needle sits at the cell's depth, the others after it.
    def spread(m: int) -> list[float]:
        rest = sorted(float(x) for x in rng.uniform(depth, 1.0, size=m - 1))
        return [depth] + rest

    choices = choice_images = None
    if task == "retrieval-text":
        obj = str(rng.choice(v.objects))
        needles = [(depth, f"The hidden object in this document is a {obj}.", None)]
        question, answer = "What is the hidden object in this document?", obj
    elif task == "counting-text":
        counts = [int(x) for x in rng.integers(1, 10, size=int(rng.integers(2, 5)))]
        needles = [(d, f"The little {v.counter} counted {n} {v.things}.", None)
                   for d, n in zip(spread(len(counts)), counts)]
        question = (f"How many {v.things} did the little {v.counter} count in each statement, in order? "
                    "Answer with a list of numbers.")
        answer = counts
    elif task == "reasoning-text":
        a, b, c = (str(x) for x in rng.choice(v.names, size=3, replace=False))
        d0, d1 = spread(2)
        needles = [(d0, f"{a} is taller than {b}.", None), (d1, f"{b} is taller than {c}.", None)]
        names = sorted([a, b, c])
        question, answer = f"Who is the tallest of {names[0]}, {names[1]} and {names[2]}?", a
    elif task == "retrieval-image":
        color = str(rng.choice(_CIRCLE_COLORS))
        im = w.new_image(draw_image(rng, w.side, w.side, color, v.needle_shape))
        needles = [(depth, "", im)]
        choices = [f"a {c} {v.needle_shape}" for c in _CIRCLE_COLORS]
        question = f"One of the images shows a {v.needle_shape}. Which of the following is it?"
        answer = _CIRCLE_COLORS.index(color)
    elif task == "counting-image":
        counts = [int(x) for x in rng.integers(1, 6, size=int(rng.integers(2, 4)))]
        needles = [(d, "", w.new_image(draw_dots(rng, w.side, n, v.dot_color)))
                   for d, n in zip(spread(len(counts)), counts)]
        question = (f"Some images show {v.dot_color} dots. How many {v.dot_color} dots does each of them show, "
                    f"in order? "
                    "Answer with a list of numbers.")
        answer = counts
    elif task == "reasoning-image":
        color = str(rng.choice(_CIRCLE_COLORS))
        im = w.new_image(draw_image(rng, w.side, w.side, color, v.needle_shape))
        needles = [(depth, "", im)]
        order = [str(c) for c in rng.permutation(_CIRCLE_COLORS)]
        choice_images = [w.new_image(draw_image(rng, w.side, w.side, c, "square")) for c in order]
        question = f"One of the images shows a {v.needle_shape}. Which option shows a square of the same colour?"
        answer = order.index(color)
    else:
        raise ValueError(f"task {task!r} is not one of {TASKS}")
    context, imgs, total, depths, image_tokens = w.document(target, needles)
    # The options' own tokens count too: the prompt's length is what a model has to read.
    total += len(choice_images or []) * w.image_tokens
    image_tokens += len(choice_images or []) * w.image_tokens
    return NeedleSample(f"{task}/{qid}", task, context, question, answer, imgs, choices, choice_images, total, depths,
                        target_length=int(target), target_depth=float(depth), qid=qid, placed_depth=list(depths),
                        needles=[im if im else text for _, text, im in needles],
                        context_length_text=total - image_tokens, context_length_image=image_tokens)


def synth_needles(lengths: Sequence[int], depths: Sequence[float], *, tasks: Sequence[str] = TASKS,
                  samples_per_cell: int = 1, seed: int = 0, count_tokens: Optional[Callable[[str], int]] = None,
                  image_tokens: int = 256, image_fraction: float = 0.5, image_side: int = 64,
                  split: str = "eval") -> tuple[list[NeedleSample], dict[str, bytes]]:
    """One sample per (task, length, depth, repeat), deterministic in ``seed``; returns the samples
    (their ``load_image`` reads the returned bytes) and the images by name.

    ``lengths``: context lengths in tokens as ``count_tokens`` (default: ~1.3 tokens per word)
    counts text and ``image_tokens`` counts each image; ``image_fraction`` of each context is
    distractor images (noisy squares, shared by all samples); ``depths`` in [0, 1]. ``split``: whose
    needles (:data:`SPLITS`): ``eval`` (the evaluation sets) or ``train`` (disjoint from them, for
    :func:`training_records`)."""
    if count_tokens is None:
        def count_tokens(text: str) -> int:
            return max(1, int(round(1.3 * len(text.split()))))
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {bad}; choose from {TASKS}")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must lie in [0, 1], got {list(depths)}")
    if any(int(n) < 1 for n in lengths):
        raise ValueError(f"lengths must be >= 1 token, got {list(lengths)}")
    if not 0.0 <= image_fraction < 1.0:
        raise ValueError(f"image_fraction must be in [0, 1), got {image_fraction}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {sorted(SPLITS)}")
    vocab = SPLITS[split]
    # eval keeps the plain seed, so the sets generated before splits existed stay the same
    rng = np.random.default_rng([seed, vocab.seed_tag] if vocab.seed_tag else seed)
    images: dict[str, bytes] = {}
    distractors = []
    for k in range(16):
        name = f"haystack_{k:02d}.png"
        images[name] = encode_image(draw_image(rng, image_side, image_side, str(rng.choice(["green", "blue", "yellow"])),
                                               "square", noisy=True), "png")
        distractors.append(name)
    w = _Writer(rng, count_tokens, image_tokens, image_fraction, images, distractors, image_side)
    samples = []
    for task in tasks:
        qid = 0  # MM-NIAH's ids: ints from 0, per task
        for length in lengths:
            for depth in depths:
                for _ in range(samples_per_cell):
                    samples.append(_task_sample(w, task, int(length), float(depth), qid, vocab))
                    qid += 1
    for s in samples:
        s.load_image = images.__getitem__
    return samples, images


def write_needles(out_dir: str | Path, samples: Sequence[NeedleSample], images: dict[str, bytes]) -> Path:
    """MM-NIAH's layout as it ships a split: ``out_dir/annotations/<task>.jsonl`` (one file per task,
    :func:`to_record` lines) and ``out_dir/images/`` (the paths in the lines are relative to it, as
    MM-NIAH's ``root``). Returns ``out_dir`` (``read_mmniah(out_dir)`` reads it back; name it
    ``mm_niah_<split>`` to give result files that split). Refuses to overwrite annotation files."""
    out = Path(out_dir)
    ann = out / "annotations"
    by: dict[str, list[NeedleSample]] = {}
    for s in samples:
        by.setdefault(s.task, []).append(s)
    taken = [str(ann / f"{t}.jsonl") for t in by if (ann / f"{t}.jsonl").exists()]
    if taken:
        raise FileExistsError(f"{', '.join(taken)} exist(s): give an empty output folder")
    (out / "images").mkdir(parents=True, exist_ok=True)
    ann.mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (out / "images" / name).write_bytes(data)
    for task, group in by.items():
        with open(ann / f"{task}.jsonl", "w", encoding="utf-8") as f:
            for s in group:
                f.write(json.dumps(to_record(s)) + "\n")
    return out


def training_records(samples: Sequence[NeedleSample], style: str | PromptStyle = "mmniah") -> list[dict[str, Any]]:
    """InternVL-format training records (docs/data.md) of needle samples: the user turn is the
    question as ``style`` asks it (:func:`prompt_of`, as ``v2pe-eval`` asks it), the assistant turn
    :func:`answer_text`, so the loss falls on the answer alone."""
    out = []
    for s in samples:
        text, images = prompt_of(s, style)
        rec: dict[str, Any] = {"id": s.id, "conversations": [{"from": "human", "value": text},
                                                             {"from": "gpt", "value": answer_text(s)}]}
        if images:
            rec["image"] = images
        out.append(rec)
    return out
