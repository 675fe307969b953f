"""sentencepiece tokenizers with InternVL's special tokens.

Two layouts:

- the tiny in-process model (tests, demo): a BPE model trained in memory whose user-defined symbols
  are InternLM2's specials in InternLM2's order, so ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2,
  ``<|im_end|>`` 3, ``<|im_start|>`` 4, ``<img>`` 5, ``</img>`` 6, ``<IMG_CONTEXT>`` 7 (the ``tiny``
  model preset hard-codes these ids);
- a real InternLM2 ``tokenizer.model``: the chat and image tokens are HF "added tokens" that the
  sentencepiece model does not know. Their ids come from ``added_tokens.json`` or
  ``tokenizer_config.json`` next to the model when present, else from InternVL2's known table.

Text is split on the special strings first and only the pieces between them go through
sentencepiece, so a special token is always one id whichever layout holds it.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from v2pe_megatron.config import Recipe

IM_END, IM_START = "<|im_end|>", "<|im_start|>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"

# Order matters: the tiny model's ids 3..7 and InternLM2's 92542.. follow it.
SPECIAL_TOKENS: tuple[str, ...] = (IM_END, IM_START, IMG_START, IMG_END, IMG_CONTEXT,
                                   "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")

# InternVL2-2B (InternLM2-chat-1.8B + InternVL's added tokens), docs/internvl.md.
INTERNVL2_ADDED_TOKENS: dict[str, int] = {tok: 92542 + i for i, tok in enumerate(SPECIAL_TOKENS)}

TINY_VOCAB_SIZE = 512


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """sentencepiece + special tokens. ``vocab_size`` covers the added tokens too."""

    def __init__(self, sp, specials: dict[str, int], *, pad_id: int | None = None) -> None:
        self.sp = sp
        self.specials = dict(specials)
        missing = [t for t in (IM_END, IM_START, IMG_START, IMG_END, IMG_CONTEXT) if t not in self.specials]
        if missing:
            raise TokenizerError(f"tokenizer has no id for {missing}")
        self._id_to_special = {v: k for k, v in self.specials.items()}
        # Longest first so that no special is matched by a prefix of another.
        alts = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(a) for a in alts) + ")")
        # Models with a dummy prefix (InternLM2's) prepend a space to every encoded chunk themselves.
        self._dummy_prefix = sp.encode_as_pieces("a")[0].startswith("\u2581")
        self.bos_id = sp.bos_id()
        self.eos_id = sp.eos_id()
        self.unk_id = sp.unk_id()
        self.pad_id = pad_id if pad_id is not None else (sp.pad_id() if sp.pad_id() >= 0 else self.eos_id)
        self.vocab_size = max(sp.get_piece_size(), max(self.specials.values()) + 1)
        self.im_start_id = self.specials[IM_START]
        self.im_end_id = self.specials[IM_END]
        self.img_start_id = self.specials[IMG_START]
        self.img_end_id = self.specials[IMG_END]
        self.img_context_id = self.specials[IMG_CONTEXT]

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no BOS/EOS); special strings map to their single ids."""
        out: list[int] = []
        for part in self._split.split(text):
            if not part:
                continue
            sid = self.specials.get(part)
            if sid is not None:
                out.append(sid)
            else:
                out.extend(self.sp.encode(part))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in (int(x) for x in ids):
            tok = self._id_to_special.get(i)
            if tok is None and i >= self.sp.get_piece_size():
                tok = f"<unk:{i}>"
            if tok is None:
                run.append(i)
                continue
            if run:
                parts.append(self._decode_run(run))
                run = []
            parts.append(tok)
        if run:
            parts.append(self._decode_run(run))
        return "".join(parts)

    def _decode_run(self, run: list[int]) -> str:
        # sentencepiece drops the leading space of a decoded run; keep it (runs sit between specials).
        text = self.sp.decode(run)
        lead = self.sp.id_to_piece(run[0]).startswith("\u2581")
        return " " + text if lead and not self._dummy_prefix and not text.startswith(" ") else text

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, img_context_id={self.img_context_id})"


# ---------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------
_TINY_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A picture shows a cat sitting on a mat. "
    "What is in the image? Describe the photo in detail. The answer is forty two. "
    "User asks a question and the assistant answers it politely. Numbers 0 1 2 3 4 5 6 7 8 9. "
    "The secret number hidden in the long document is written here. Which image is red green blue? "
    "A rocket stands on the launch pad; coffee in a cup; an astronaut in a white suit; a camera man."
)


def train_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE, corpus: Iterable[str] | None = None) -> Tokenizer:
    """Tiny BPE model trained in memory (~tens of ms). Byte fallback keeps any text encodable."""
    import sentencepiece as spm

    lines = list(corpus) if corpus is not None else [_TINY_CORPUS] * 4 + _TINY_CORPUS.split(". ")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        user_defined_symbols=list(SPECIAL_TOKENS), byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=False, hard_vocab_limit=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    specials = {t: sp.piece_to_id(t) for t in SPECIAL_TOKENS}
    return Tokenizer(sp, specials)


def _added_tokens_from_files(model_path: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    added = model_path.parent / "added_tokens.json"
    if added.is_file():
        found.update({str(k): int(v) for k, v in json.loads(added.read_text()).items()})
    cfg = model_path.parent / "tokenizer_config.json"
    if cfg.is_file():
        dec = json.loads(cfg.read_text()).get("added_tokens_decoder", {})
        for idx, entry in dec.items():
            content = entry.get("content") if isinstance(entry, dict) else None
            if content:
                found.setdefault(content, int(idx))
    return found


def load_tokenizer(path: str | Path, *, known_added: dict[str, int] | None = None) -> Tokenizer:
    """A sentencepiece ``tokenizer.model`` plus its special tokens (see module docstring)."""
    import sentencepiece as spm

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.model"
    if not p.is_file():
        raise TokenizerError(f"tokenizer model not found: {p}")
    sp = spm.SentencePieceProcessor(model_file=str(p))
    table = INTERNVL2_ADDED_TOKENS if known_added is None else known_added
    from_files = _added_tokens_from_files(p)
    specials: dict[str, int] = {}
    for tok in SPECIAL_TOKENS:
        sid = sp.piece_to_id(tok)
        if sid != sp.unk_id() and sp.id_to_piece(sid) == tok:
            specials[tok] = sid  # the model itself knows it (tiny layout)
        elif tok in from_files:
            specials[tok] = from_files[tok]
        elif tok in table and table[tok] >= sp.get_piece_size():
            specials[tok] = table[tok]
    missing = [t for t in (IM_END, IM_START, IMG_START, IMG_END, IMG_CONTEXT) if t not in specials]
    if missing:
        raise TokenizerError(
            f"{p}: no id for {missing}: put added_tokens.json or tokenizer_config.json (from the HF "
            f"checkpoint) next to the model file")
    pad = None
    cfg = p.parent / "tokenizer_config.json"
    if cfg.is_file():
        pad_tok = json.loads(cfg.read_text()).get("pad_token")
        if isinstance(pad_tok, dict):
            pad_tok = pad_tok.get("content")
        if isinstance(pad_tok, str):
            pid = specials.get(pad_tok, sp.piece_to_id(pad_tok))
            pad = int(pid)
    return Tokenizer(sp, specials, pad_id=pad)


def check_tokenizer(recipe: "Recipe", tok: Tokenizer) -> None:
    """The model's image token ids and vocabulary against the tokenizer's; TokenizerError names the
    keys that differ. Torch-free: ``v2pe-train`` runs it before any rank starts (``preflight``)."""
    m = recipe.model
    want = {"img_start_token_id": (m.img_start_token_id, tok.img_start_id),
            "img_end_token_id": (m.img_end_token_id, tok.img_end_id),
            "img_context_token_id": (m.img_context_token_id, tok.img_context_id)}
    bad = {k: v for k, v in want.items() if v[0] != v[1]}
    if bad:
        raise TokenizerError("tokenizer and model disagree on image token ids: "
                             + ", ".join(f"model.{k}={a} but the tokenizer has {b}" for k, (a, b) in bad.items()))
    if tok.vocab_size > m.language.vocab_size:
        raise TokenizerError(f"tokenizer has {tok.vocab_size} ids but model.language.vocab_size="
                             f"{m.language.vocab_size}")


def save_tiny_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write the tiny model's bytes (for ``data.tokenizer_path`` round trips)."""
    p = Path(path)
    p.write_bytes(tok.sp.serialized_model_proto())
    return p


def build_tokenizer(tokenizer_path: str = "") -> Tokenizer:
    return load_tokenizer(tokenizer_path) if tokenizer_path else tiny_tokenizer()


_TINY: Tokenizer | None = None


def tiny_tokenizer() -> Tokenizer:
    """The shared tiny tokenizer (trained once per process)."""
    global _TINY
    if _TINY is None:
        _TINY = train_tiny_tokenizer()
    return _TINY


def ids_array(ids: list[int]) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64)
