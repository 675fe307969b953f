"""Chat templates, ``<image>`` expansion and the assistant-only training mask.

``internlm2-chat`` (InternVL's template, docs/internvl.md)::

    <s><|im_start|>system\\n{sys}<|im_end|><|im_start|>user\\n{q}<|im_end|><|im_start|>assistant\\n{a}<|im_end|>...

The system block is left out when there is no system prompt. Only the assistant's answer and its
closing ``<|im_end|>`` are targets; the ``<|im_start|>assistant\\n`` header is prompt.

``plain``: ``<s>{q}{a}...</s>`` with the answers and the final ``</s>`` as targets. A plain-text
sample (``text`` instead of ``conversations``) is ``<s>{text}</s>``, all of it a target.

Each ``<image>`` becomes ``<img>`` + num_image_token x tiles ``<IMG_CONTEXT>`` + ``</img>``, built
from ids directly (never through the text tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from v2pe_megatron.data.skips import SampleError
from v2pe_megatron.data.tokenizer import Tokenizer

IMAGE_PLACEHOLDER = "<image>"
_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


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


def tokenize_sample(tok: Tokenizer, *, conversations: Sequence[dict[str, Any]] | None = None,
                    text: str | None = None, tiles_per_image: Sequence[int] = (), num_image_token: int = 256,
                    template: str = "internlm2-chat", system_prompt: str = "") -> Tokenized:
    """Token ids and target mask of one sample (see module docstring for the layout)."""
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
    sys_msgs = [t["value"] for t in turns if t["from"] == "system"]
    system = sys_msgs[0] if sys_msgs else system_prompt
    turns = [t for t in turns if t["from"] != "system"]
    b.ids_([tok.bos_id], False)
    if template == "internlm2-chat":
        if system:
            b.ids_([tok.im_start_id], False)
            b.text("system\n" + system, False)
            b.ids_([tok.im_end_id], False)
        for t in turns:
            answer = t["from"] == "assistant"
            b.ids_([tok.im_start_id], False)
            b.ids_(tok.encode(t["from"] + "\n"), False)
            b.text(t["value"], answer)
            b.ids_([tok.im_end_id], answer)
    elif template == "plain":
        if system:
            b.text(system, False)
        for t in turns:
            b.text(t["value"], t["from"] == "assistant")
        b.ids_([tok.eos_id], True)
    else:
        raise ValueError(f"unknown chat template {template!r}")
    return b.done()
