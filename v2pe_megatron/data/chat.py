"""Chat templates, ``<image>`` expansion and the assistant-only training mask.

``internlm2-chat`` (InternVL's template, docs/internvl.md)::

    <s><|im_start|>system\n{sys}<|im_end|><|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n{a}<|im_end|>...

The system message is the template's own unless the recipe says otherwise (``data.system_prompt``,
read by :func:`chat_format` alone): InternVL's (:data:`INTERNVL_SYSTEM_MESSAGE`), the one InternVL and
V2PE train with and that MM-NIAH's and V2PE's evaluations put first, so that training and
``v2pe-eval`` build the same turns. An empty system prompt leaves the system block out. Only the
assistant's answer and its closing ``<|im_end|>`` are targets; the ``<|im_start|>assistant\n``
header is prompt.

``plain``: ``<s>{q}{a}...</s>`` with the answers and the final ``</s>`` as targets (no system message
of its own). A plain-text sample (``text`` instead of ``conversations``) is ``<s>{text}</s>``, all of
it a target.

Each ``<image>`` becomes ``<img>`` + num_image_token x tiles ``<IMG_CONTEXT>`` + ``</img>``, built
from ids directly (never through the text tokenizer). The template's layout is made once
(:func:`_pieces`): :func:`tokenize_sample` turns it into ids, :func:`render_conversation` into the
text a Hugging Face tokenizer would be given (what the references' prompt strings are compared with).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from v2pe_megatron.data.skips import SampleError
from v2pe_megatron.data.tokenizer import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START, Tokenizer

IMAGE_PLACEHOLDER = "<image>"
# InternVL's system message: the ``internlm2-chat`` conversation template's own (InternVL's
# conversation.py, copied unchanged into V2PE and MM-NIAH).
INTERNVL_SYSTEM_MESSAGE = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
                           "英文名叫InternVL, 是一个有用无害的人工智能助手。")
TEMPLATE_SYSTEM_MESSAGE = {"internlm2-chat": INTERNVL_SYSTEM_MESSAGE, "plain": ""}
_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class ChatFormat:
    """A chat template and its system message ("" = no system turn)."""

    template: str = "internlm2-chat"
    system: str = INTERNVL_SYSTEM_MESSAGE

    def __post_init__(self) -> None:
        if self.template not in TEMPLATE_SYSTEM_MESSAGE:
            raise ValueError(f"unknown chat template {self.template!r}; "
                             f"choose one of {sorted(TEMPLATE_SYSTEM_MESSAGE)}")


def chat_format(data) -> ChatFormat:
    """The recipe's chat format (``data.template``, ``data.system_prompt``; the one reader of the
    latter): ``system_prompt`` null/unset is the template's own system message, ``""`` none."""
    system = TEMPLATE_SYSTEM_MESSAGE.get(data.template, "") if data.system_prompt is None else data.system_prompt
    return ChatFormat(data.template, system)


@dataclass
class Tokenized:
    ids: np.ndarray       # int64 [L]
    target: np.ndarray    # bool [L]: token belongs to an assistant answer (incl. its <|im_end|>)
    num_images: int


def count_placeholders(conversations: Sequence[dict[str, Any]] | None, text: str | None) -> int:
    if conversations is not None:
        return sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conversations)
    return (text or "").count(IMAGE_PLACEHOLDER)


def normalize_turns(conversations: Sequence[dict[str, Any]], num_images: int) -> list[dict[str, str]]:
    """Checks the turns against the images. Like InternVL, a single image without any ``<image>``
    goes in front of the first user turn; any other count mismatch is a skip."""
    turns = [{"from": _ROLE[t["from"]], "value": t["value"]} for t in conversations]
    if not any(t["from"] == "assistant" and t["value"].strip() for t in turns):
        raise SampleError("empty_conversation", "no non-empty assistant turn")
    n_ph = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    if n_ph == 0 and num_images == 1:
        first = next((t for t in turns if t["from"] == "user"), None)
        if first is not None:
            first["value"] = IMAGE_PLACEHOLDER + "\n" + first["value"]
            n_ph = 1
    if n_ph != num_images:
        raise SampleError("image_count_mismatch", f"{n_ph} <image> placeholder(s) for {num_images} image(s)")
    return turns


class _Builder:
    def __init__(self, tok: Tokenizer, tiles: Sequence[int], num_image_token: int) -> None:
        self.tok = tok
        self.tiles = list(tiles)
        self.nit = num_image_token
        self.ids: list[np.ndarray] = []
        self.tgt: list[np.ndarray] = []
        self.img = 0
        self._markup = {tok.img_start_id, tok.img_end_id, tok.img_context_id}

    def ids_(self, ids: Sequence[int] | np.ndarray, target: bool) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        self.ids.append(arr)
        self.tgt.append(np.full(arr.size, target, dtype=bool))

    def text(self, s: str, target: bool) -> None:
        """Text with ``<image>`` placeholders."""
        parts = s.split(IMAGE_PLACEHOLDER)
        for k, part in enumerate(parts):
            if part:
                ids = self.tok.encode(part)
                if self._markup.intersection(ids):
                    raise SampleError("bad_markup", "text contains <img>/</img>/<IMG_CONTEXT> itself")
                self.ids_(ids, target)
            if k < len(parts) - 1:
                n = self.nit * self.tiles[self.img]
                self.img += 1
                block = np.full(n + 2, self.tok.img_context_id, dtype=np.int64)
                block[0], block[-1] = self.tok.img_start_id, self.tok.img_end_id
                self.ids_(block, False)  # image tokens never carry loss, even inside an answer

    def done(self) -> Tokenized:
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)
        tgt = np.concatenate(self.tgt) if self.tgt else np.zeros(0, bool)
        return Tokenized(ids, tgt, self.img)


def _pieces(turns: list[dict[str, str]], chat: ChatFormat) -> Iterator[tuple[str, str, bool]]:
    """The template's layout after ``<s>``: (kind, value, is_target) with kind ``special`` (a
    special token's string: one id) or ``text`` (text with ``<image>`` placeholders)."""
    sys_msgs = [t["value"] for t in turns if t["from"] == "system"]
    system = sys_msgs[0] if sys_msgs else chat.system
    turns = [t for t in turns if t["from"] != "system"]
    if chat.template == "internlm2-chat":
        if system:
            yield "special", IM_START, False
            yield "text", "system\n" + system, False
            yield "special", IM_END, False
        for t in turns:
            answer = t["from"] == "assistant"
            yield "special", IM_START, False
            yield "text", t["from"] + "\n", False
            if t["value"] is not None:  # None: the open answer a model continues (render_conversation)
                yield "text", t["value"], answer
                yield "special", IM_END, answer
    elif chat.template == "plain":
        if system:
            yield "text", system, False
        for t in turns:
            if t["value"] is not None:
                yield "text", t["value"], t["from"] == "assistant"
        if turns and turns[-1]["value"] is not None:
            yield "special", "</s>", True
    else:
        raise ValueError(f"unknown chat template {chat.template!r}")


def tokenize_sample(tok: Tokenizer, *, conversations: Sequence[dict[str, Any]] | None = None,
                    text: str | None = None, tiles_per_image: Sequence[int] = (), num_image_token: int = 256,
                    chat: Optional[ChatFormat] = None) -> Tokenized:
    """Token ids and target mask of one sample (see module docstring for the layout); ``chat``:
    the recipe's :func:`chat_format` (default: ``internlm2-chat`` with InternVL's system message)."""
    b = _Builder(tok, tiles_per_image, num_image_token)
    if conversations is None:
        if not (text or "").strip():
            raise SampleError("empty_conversation", "empty text")
        if count_placeholders(None, text) != len(tiles_per_image):
            raise SampleError("image_count_mismatch",
                              f"{count_placeholders(None, text)} <image> for {len(tiles_per_image)} image(s)")
        b.ids_([tok.bos_id], False)
        b.text(text or "", True)
        b.ids_([tok.eos_id], True)
        return b.done()

    turns = normalize_turns(conversations, len(tiles_per_image))
    special = {IM_START: tok.im_start_id, IM_END: tok.im_end_id, "</s>": tok.eos_id}
    b.ids_([tok.bos_id], False)
    for kind, value, target in _pieces(turns, chat or ChatFormat()):
        if kind == "special":
            b.ids_([special[value]], target)
        else:
            b.text(value, target)
    return b.done()


def render_conversation(conversations: Sequence[dict[str, Any]], *, tiles_per_image: Sequence[int] = (),
                        num_image_token: int = 256, chat: Optional[ChatFormat] = None) -> str:
    """The text of a conversation as the template lays it out, ``<image>`` expanded to
    ``<img><IMG_CONTEXT>...</img>``, without the ``<s>`` a tokenizer puts in front: the string
    InternVL's ``get_prompt()`` hands its tokenizer. A last assistant turn whose value is None
    renders as its open header (the prompt a model continues). Same pieces as
    :func:`tokenize_sample`; no checks beyond the image count."""
    turns = [{"from": _ROLE[t["from"]], "value": t["value"]} for t in conversations]
    tiles = list(tiles_per_image)
    out: list[str] = []
    for kind, value, _ in _pieces(turns, chat or ChatFormat()):
        if kind == "special":
            out.append(value)
            continue
        parts = value.split(IMAGE_PLACEHOLDER)
        for k, part in enumerate(parts):
            out.append(part)
            if k < len(parts) - 1:
                if not tiles:
                    raise ValueError(f"more <image> placeholders than the {len(tiles_per_image)} image(s) given")
                out.append(IMG_START + IMG_CONTEXT * (num_image_token * tiles.pop(0)) + IMG_END)
    if tiles:
        raise ValueError(f"{len(tiles_per_image)} image(s) for {len(tiles_per_image) - len(tiles)} "
                         f"<image> placeholder(s)")
    return "".join(out)
