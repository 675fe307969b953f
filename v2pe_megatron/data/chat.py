"""Chat templates, ``<image>`` expansion and the assistant-only training mask.

The templates are InternVL's (its ``conversation.py``; which checkpoint uses which: docs/data.md),
each a turn layout and a default system message (:data:`TEMPLATES`):

    internlm2-chat  <|im_start|>system\n{sys}<|im_end|><|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n{a}<|im_end|>...
    Hermes-2        the same layout (InternVL2-1B/40B: Qwen2, Yi)
    internvl2_5     the same with "\n" after every <|im_end|>, another system message (InternVL2.5/3)
    phi3-chat       <|system|>\n{sys}<|end|><|user|>\n{q}<|end|><|assistant|>\n{a}<|end|>...  (InternVL2-4B)

A sequence starts with the tokenizer's BOS when the tokenizer adds one itself (``add_bos_token``:
InternLM2's ``<s>``, none for Qwen), as InternVL's ``tokenizer(conversation)`` does. The system
message is the template's own unless the recipe says otherwise (``data.system_prompt``, read by
:func:`chat_format` alone), so that training and ``v2pe-eval`` build the same turns; a sample's own
``system`` turn wins over both. An empty system prompt leaves the system block out. Targets (loss):
only the assistant's answers and the end token that closes each (``<|im_end|>`` / ``<|end|>``); the
assistant header, the ``\n`` after an end token (internvl2_5), BOS, system and user turns are prompt,
and image tokens never carry loss.

``plain``: ``{q}{a}...{eos}`` (after BOS) with the answers and the final EOS as targets (no system
message of its own). A plain-text sample (``text`` instead of ``conversations``) is ``{text}{eos}``,
all of it a target.

Each ``<image>`` becomes ``<img>`` + num_image_token x tiles ``<IMG_CONTEXT>`` + ``</img>``, built
from ids directly (never through the text tokenizer). The template's layout is made once
(:func:`_pieces`): :func:`tokenize_sample` turns it into ids, :func:`render_conversation` into the
text a Hugging Face tokenizer would be given. The text between two special tokens (or images) is
encoded whole, as a tokenizer encodes the rendered text, so the ids are ``tokenizer(rendered)``'s;
a token is a target when any of its characters belongs to an answer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from v2pe_megatron.config import CHAT_TEMPLATES
from v2pe_megatron.data.skips import SampleError
from v2pe_megatron.data.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, Tokenizer, TokenizerError, check_token_ids

IMAGE_PLACEHOLDER = "<image>"
# InternVL's system messages (its conversation.py, copied unchanged into V2PE and MM-NIAH):
# internlm2-chat, Hermes-2 and phi3-chat share the first, internvl2_5 has its own.
INTERNVL_SYSTEM_MESSAGE = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
                           "英文名叫InternVL, 是一个有用无害的人工智能助手。")
INTERNVL2_5_SYSTEM_MESSAGE = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位"
                              "联合开发的多模态大语言模型。")


@dataclass(frozen=True)
class Template:
    """One turn layout: each role opens with a special token and a text header, every turn closes
    with ``end`` (a special token) and then ``after_end`` (text, never a target)."""

    system_message: str
    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    end: str
    after_end: str = ""

    def specials(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.system[0], self.user[0], self.assistant[0], self.end)))


_CHATML = dict(system=("<|im_start|>", "system\n"), user=("<|im_start|>", "user\n"),
               assistant=("<|im_start|>", "assistant\n"), end="<|im_end|>")
TEMPLATES: dict[str, Template] = {
    "internlm2-chat": Template(INTERNVL_SYSTEM_MESSAGE, **_CHATML),
    "Hermes-2": Template(INTERNVL_SYSTEM_MESSAGE, **_CHATML),
    "internvl2_5": Template(INTERNVL2_5_SYSTEM_MESSAGE, **_CHATML, after_end="\n"),
    "phi3-chat": Template(INTERNVL_SYSTEM_MESSAGE, system=("<|system|>", "\n"), user=("<|user|>", "\n"),
                          assistant=("<|assistant|>", "\n"), end="<|end|>"),
}
# Every value data.template takes: the recipe schema's list, which must name exactly these layouts.
if set(CHAT_TEMPLATES) != {*TEMPLATES, "plain"}:
    raise RuntimeError("config.CHAT_TEMPLATES and data.chat.TEMPLATES name different templates")
TEMPLATE_SYSTEM_MESSAGE = {**{k: t.system_message for k, t in TEMPLATES.items()}, "plain": ""}
_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class ChatFormat:
    """A chat template and its system message ("" = no system turn)."""

    template: str = "internlm2-chat"
    system: str = INTERNVL_SYSTEM_MESSAGE

    def __post_init__(self) -> None:
        if self.template not in CHAT_TEMPLATES:
            raise ValueError(f"unknown chat template {self.template!r}; choose one of {list(CHAT_TEMPLATES)}")

    def special_tokens(self) -> tuple[str, ...]:
        """The special token strings the template writes (the tokenizer must have each)."""
        t = TEMPLATES.get(self.template)
        return t.specials() if t else ()

    def answer_end_id(self, tok: Tokenizer) -> int:
        """The id that closes an answer (the template's end token; ``plain``: EOS)."""
        t = TEMPLATES.get(self.template)
        return tok.token_id(t.end) if t else tok.eos_id


def chat_format(data) -> ChatFormat:
    """The recipe's chat format (``data.template``, ``data.system_prompt``; the one reader of both):
    ``system_prompt`` null/unset is the template's own system message, ``""`` none."""
    system = TEMPLATE_SYSTEM_MESSAGE.get(data.template, "") if data.system_prompt is None else data.system_prompt
    return ChatFormat(data.template, system)


def check_tokenizer(recipe, tok: Tokenizer) -> None:
    """The tokenizer against the recipe: the model's image token ids and vocabulary
    (``tokenizer.check_token_ids``) and the special tokens ``data.template`` writes; TokenizerError
    names what differs. Torch-free: ``v2pe-train`` runs it before any rank starts (``preflight``),
    the loader again."""
    check_token_ids(recipe, tok)
    chat = chat_format(recipe.data)
    lacking = [t for t in chat.special_tokens() if t not in tok.specials]
    if lacking:
        raise TokenizerError(f"data.template={chat.template} writes {lacking}, which the tokenizer does not have as "
                             f"special tokens: choose the template of the tokenizer's model (docs/data.md)")


@dataclass
class Tokenized:
    ids: np.ndarray       # int64 [L]
    target: np.ndarray    # bool [L]: token belongs to an assistant answer (incl. its end token)
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


_MARKUP = (IMG_START, IMG_END, IMG_CONTEXT)


def _layout(pieces: Iterator[tuple[str, str, bool]], image_text: Sequence[str]) -> tuple[str, list[tuple[int, int]], bool]:
    """The template's text with each ``<image>`` replaced by ``image_text[k]``; the character spans
    of the targets; whether it ends with EOS. SampleError when a text holds image markup itself."""
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    pos, img, eos = 0, 0, False
    for kind, value, target in pieces:
        if kind == "special" and value == EOS:
            eos = True
            continue
        if kind == "text" and any(m in value for m in _MARKUP):
            raise SampleError("bad_markup", "text contains <img>/</img>/<IMG_CONTEXT> itself")
        parts = [value] if kind == "special" else value.split(IMAGE_PLACEHOLDER)
        for k, part in enumerate(parts):
            if part:
                if target:
                    spans.append((pos, pos + len(part)))
                out.append(part)
                pos += len(part)
            if k < len(parts) - 1:
                out.append(image_text[img])  # image tokens never carry loss, even inside an answer
                pos += len(image_text[img])
                img += 1
    return "".join(out), spans, eos


EOS = "\x00eos"  # the piece value that stands for the tokenizer's EOS (plain template)


def _pieces(turns: list[dict[str, str]], chat: ChatFormat) -> Iterator[tuple[str, str, bool]]:
    """The template's layout after BOS: (kind, value, is_target) with kind ``special`` (a special
    token's string, or :data:`EOS`: one id) or ``text`` (text with ``<image>`` placeholders)."""
    sys_msgs = [t["value"] for t in turns if t["from"] == "system"]
    system = sys_msgs[0] if sys_msgs else chat.system
    turns = [t for t in turns if t["from"] != "system"]
    tpl = TEMPLATES.get(chat.template)
    if tpl is not None:
        if system:
            yield "special", tpl.system[0], False
            yield "text", tpl.system[1] + system, False
            yield "special", tpl.end, False
            if tpl.after_end:
                yield "text", tpl.after_end, False
        for t in turns:
            answer = t["from"] == "assistant"
            opener, header = tpl.assistant if answer else tpl.user
            yield "special", opener, False
            yield "text", header, False
            if t["value"] is not None:  # None: the open answer a model continues (render_conversation)
                yield "text", t["value"], answer
                yield "special", tpl.end, answer
                if tpl.after_end:
                    yield "text", tpl.after_end, False
    elif chat.template == "plain":
        if system:
            yield "text", system, False
        for t in turns:
            if t["value"] is not None:
                yield "text", t["value"], t["from"] == "assistant"
        if turns and turns[-1]["value"] is not None:
            yield "special", EOS, True
    else:
        raise ValueError(f"unknown chat template {chat.template!r}")


def tokenize_sample(tok: Tokenizer, *, conversations: Sequence[dict[str, Any]] | None = None,
                    text: str | None = None, tiles_per_image: Sequence[int] = (), num_image_token: int = 256,
                    chat: Optional[ChatFormat] = None) -> Tokenized:
    """Token ids and target mask of one sample (see module docstring for the layout); ``chat``:
    the recipe's :func:`chat_format` (default: ``internlm2-chat`` with InternVL's system message).

    The whole text goes through the tokenizer once, each image as ``<img></img>`` whose
    ``<IMG_CONTEXT>`` ids are put in afterwards: the ids of the rendered text without encoding the
    context strings, and a tokenizer's rule for the start of a text (a Metaspace prefix) applies once."""
    if conversations is None:
        if not (text or "").strip():
            raise SampleError("empty_conversation", "empty text")
        if count_placeholders(None, text) != len(tiles_per_image):
            raise SampleError("image_count_mismatch",
                              f"{count_placeholders(None, text)} <image> for {len(tiles_per_image)} image(s)")
        pieces: Iterator[tuple[str, str, bool]] = iter([("text", text or "", True), ("special", EOS, True)])
    else:
        turns = normalize_turns(conversations, len(tiles_per_image))
        pieces = _pieces(turns, chat or ChatFormat())
    pieces = list(pieces)
    for kind, value, _ in pieces:
        if kind == "special" and value != EOS:
            tok.token_id(value)  # a clear error for a template the tokenizer cannot write
    body, target_spans, eos = _layout(pieces, [IMG_START + IMG_END] * len(tiles_per_image))
    ids, tgt = tok.encode_targets(body, target_spans)
    ends = np.flatnonzero(ids == tok.img_end_id).tolist()
    if len(ends) != len(tiles_per_image):  # the tokenizer split <img></img> differently
        raise SampleError("bad_markup", f"{len(ends)} </img> for {len(tiles_per_image)} image(s)")
    out_ids: list[np.ndarray] = []
    out_tgt: list[np.ndarray] = []
    if tok.add_bos:
        out_ids.append(np.asarray([tok.bos_id], np.int64))
        out_tgt.append(np.zeros(1, bool))
    prev = 0
    for k, e in enumerate(ends):
        out_ids += [np.asarray(ids[prev:e], np.int64), np.full(num_image_token * tiles_per_image[k], tok.img_context_id,
                                                                dtype=np.int64)]
        out_tgt += [np.asarray(tgt[prev:e], bool), np.zeros(num_image_token * tiles_per_image[k], bool)]
        prev = e
    out_ids.append(np.asarray(ids[prev:], np.int64))
    out_tgt.append(np.asarray(tgt[prev:], bool))
    if eos:
        out_ids.append(np.asarray([tok.eos_id], np.int64))
        out_tgt.append(np.ones(1, bool))
    return Tokenized(np.concatenate(out_ids), np.concatenate(out_tgt), len(tiles_per_image))


def render_conversation(conversations: Sequence[dict[str, Any]], *, tiles_per_image: Sequence[int] = (),
                        num_image_token: int = 256, chat: Optional[ChatFormat] = None,
                        eos_token: str = "</s>") -> str:
    """The text of a conversation as the template lays it out, ``<image>`` expanded to
    ``<img><IMG_CONTEXT>...</img>``, without the BOS a tokenizer puts in front: the string
    InternVL's ``get_prompt()`` hands its tokenizer. A last assistant turn whose value is None
    renders as its open header (the prompt a model continues). Same pieces as
    :func:`tokenize_sample`; no checks beyond the image count. ``eos_token``: the EOS string
    (``plain`` only)."""
    turns = [{"from": _ROLE[t["from"]], "value": t["value"]} for t in conversations]
    n = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns if t["value"] is not None)
    if n != len(tiles_per_image):
        raise ValueError(f"{len(tiles_per_image)} image(s) for {n} <image> placeholder(s)")
    images = [IMG_START + IMG_CONTEXT * (num_image_token * t) + IMG_END for t in tiles_per_image]
    pieces = [(k, v, False) for k, v, _ in _pieces(turns, chat or ChatFormat())]
    text, _, eos = _layout(iter(pieces), images)
    return text + (eos_token if eos else "")
