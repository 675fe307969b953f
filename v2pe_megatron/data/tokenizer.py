"""The text tokenizer: HF ``tokenizers`` (``tokenizer.json``) or sentencepiece (``tokenizer.model``),
with the special tokens and ids of the tokenizer folder's own files.

Which one (:func:`load_tokenizer`): a folder with ``tokenizer.json`` is read with the ``tokenizers``
library (Qwen2/2.5/3, Llama-3, Yi, Phi-3 and every "fast" tokenizer transformers saves): the file
holds the whole pipeline and the added tokens, so it is what transformers itself loads first; when a
folder holds both files, ``tokenizer.json`` wins for that reason. A folder with only
``tokenizer.model`` (InternLM2/2.5, whose tokenizer is remote code around sentencepiece) is read
with sentencepiece; a path to a file picks by the file's name.

Special tokens and their ids come from the folder (``convert.hf_config.special_token_ids``:
``tokenizer.json``'s ``added_tokens``, ``added_tokens.json``, ``tokenizer_config.json``'s
``added_tokens_decoder``), bos/eos/pad/unk from ``tokenizer_config.json`` (else
``special_tokens_map.json``), ``add_bos_token`` from ``tokenizer_config.json`` (else what the
tokenizer does itself). Nothing is assumed about ids, except InternVL2's table
(:data:`INTERNVL2_ADDED_TOKENS`) for a bare InternLM2 ``tokenizer.model`` without its json files.

Two sentencepiece layouts:

- the tiny in-process model (tests, demo): a BPE model trained in memory whose user-defined symbols
  are InternLM2's specials in InternLM2's order, so ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2,
  ``<|im_end|>`` 3, ``<|im_start|>`` 4, ``<img>`` 5, ``</img>`` 6, ``<IMG_CONTEXT>`` 7 (the ``tiny``
  model preset hard-codes these ids);
- a real InternLM2 ``tokenizer.model``: the chat and image tokens are HF "added tokens" that the
  sentencepiece model does not know.

Text is split on the special strings first and only the pieces between them go through the model,
so a special token is always one id whichever layout holds it (HF ``tokenizers`` does the same with
its added tokens). :meth:`Tokenizer.encode_spans` gives each id's span of the text, which the chat
builder (``data.chat``) uses to mark the assistant's tokens inside a chunk encoded whole.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

if TYPE_CHECKING:
    from v2pe_megatron.config import Recipe

IM_END, IM_START = "<|im_end|>", "<|im_start|>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGE_TOKENS: tuple[str, ...] = (IMG_START, IMG_END, IMG_CONTEXT)

# Order matters: the tiny model's ids 3..7 and InternLM2's 92542.. follow it.
SPECIAL_TOKENS: tuple[str, ...] = (IM_END, IM_START, IMG_START, IMG_END, IMG_CONTEXT,
                                   "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")

# InternVL2-2B (InternLM2-chat-1.8B + InternVL's added tokens), docs/internvl.md.
INTERNVL2_ADDED_TOKENS: dict[str, int] = {tok: 92542 + i for i, tok in enumerate(SPECIAL_TOKENS)}

TINY_VOCAB_SIZE = 512


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """What the data pipeline needs of a tokenizer, either backend. ``specials``: every special or
    added token string -> its id (always one id); ``vocab_size`` covers the added tokens too;
    ``add_bos``: whether a sequence starts with ``bos_id`` (the tokenizer's own ``add_bos_token``)."""

    kind = "base"

    def __init__(self, specials: dict[str, int], *, bos_id: Optional[int], eos_id: Optional[int],
                 pad_id: Optional[int], unk_id: Optional[int], add_bos: bool, vocab_size: int) -> None:
        self.specials = dict(specials)
        missing = [t for t in IMAGE_TOKENS if t not in self.specials]
        if missing:
            raise TokenizerError(f"tokenizer has no id for {missing}")
        self._id_to_special = {v: k for k, v in self.specials.items()}
        # Longest first so that no special is matched by a prefix of another.
        alts = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(a) for a in alts) + ")")
        if eos_id is None:
            raise TokenizerError("tokenizer has no eos token (eos_token in tokenizer_config.json)")
        self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.add_bos = bool(add_bos and bos_id is not None)
        self.vocab_size = max(vocab_size, max(self.specials.values()) + 1)
        self.img_start_id = self.specials[IMG_START]
        self.img_end_id = self.specials[IMG_END]
        self.img_context_id = self.specials[IMG_CONTEXT]
        # The chatml tokens; None for a tokenizer without them (phi3-chat uses <|end|> etc.).
        self.im_start_id = self.specials.get(IM_START)
        self.im_end_id = self.specials.get(IM_END)

    def token_id(self, token: str) -> int:
        """The id of a special token string; TokenizerError when the tokenizer lacks it."""
        tid = self.specials.get(token)
        if tid is None:
            raise TokenizerError(f"the tokenizer has no special token {token!r} (the chat template needs it)")
        return tid

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no BOS/EOS); special strings map to their single ids."""
        return self.encode_spans(text)[0]

    def encode_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` and each id's (start, end) character span in ``text``. A chunk between
        two special strings goes through the model whole, as HF tokenizers do."""
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for part in self._split.split(text):
            if not part:
                continue
            sid = self.specials.get(part)
            if sid is not None:
                ids.append(sid)
                spans.append((pos, pos + len(part)))
            else:
                pi, ps = self._encode_chunk(part)
                ids.extend(pi)
                spans.extend((pos + a, pos + b) for a, b in ps)
            pos += len(part)
        return ids, spans

    def encode_targets(self, text: str, targets: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """Ids of ``text`` and, per id, whether any of its characters lies in one of the
        ``targets`` (start, end) character spans (the chat builder's mask)."""
        ids, spans = self.encode_spans(text)
        sp = np.asarray(spans, np.int64).reshape(-1, 2)
        tgt = np.zeros(len(ids), bool)
        for ts, te in targets:
            tgt |= (sp[:, 0] < te) & (np.maximum(sp[:, 1], sp[:, 0] + 1) > ts)
        return np.asarray(ids, np.int64), tgt

    def _encode_chunk(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        raise NotImplementedError

    def _decode_run(self, run: list[int]) -> str:
        raise NotImplementedError

    def _known(self, i: int) -> bool:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in (int(x) for x in ids):
            tok = self._id_to_special.get(i)
            if tok is None and not self._known(i):
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, img_context_id={self.img_context_id})"


class SentencePieceTokenizer(Tokenizer):
    """sentencepiece + special tokens (InternLM2/2.5 and the tiny model)."""

    kind = "sentencepiece"

    def __init__(self, sp, specials: dict[str, int], *, pad_id: int | None = None, add_bos: bool = True,
                 bos_id: int | None = None, eos_id: int | None = None) -> None:
        self.sp = sp
        # Models with a dummy prefix (InternLM2's) prepend a space to every encoded chunk themselves.
        self._dummy_prefix = sp.encode_as_pieces("a")[0].startswith("\u2581")
        bos = bos_id if bos_id is not None else (sp.bos_id() if sp.bos_id() >= 0 else None)
        eos = eos_id if eos_id is not None else (sp.eos_id() if sp.eos_id() >= 0 else None)
        pad = pad_id if pad_id is not None else (sp.pad_id() if sp.pad_id() >= 0 else None)
        super().__init__(specials, bos_id=bos, eos_id=eos, pad_id=pad, unk_id=sp.unk_id(), add_bos=add_bos,
                         vocab_size=sp.get_piece_size())

    def encode_targets(self, text: str, targets: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        # Offsets cost a protobuf per chunk: only a chunk that a target span cuts asks for them.
        ids: list[np.ndarray] = []
        tgt: list[np.ndarray] = []
        pos = 0
        for part in self._split.split(text):
            if not part:
                continue
            end = pos + len(part)
            inside = sum(max(0, min(end, te) - max(pos, ts)) for ts, te in targets)
            if part in self.specials or inside in (0, len(part)):
                pi = [self.specials[part]] if part in self.specials else self.sp.encode(part)
                ids.append(np.asarray(pi, np.int64))
                tgt.append(np.full(len(pi), inside > 0, bool))
            else:
                pi, pt = super().encode_targets(part, [(ts - pos, te - pos) for ts, te in targets])
                ids.append(pi)
                tgt.append(pt)
            pos = end
        if not ids:
            return np.zeros(0, np.int64), np.zeros(0, bool)
        return np.concatenate(ids), np.concatenate(tgt)

    def _encode_chunk(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # sentencepiece's offsets count UTF-8 bytes; a character's byte-fallback pieces share its span.
        proto = self.sp.encode(text, out_type="proto")
        ids = [p.id for p in proto.pieces]
        begin = np.fromiter((p.begin for p in proto.pieces), np.int64, len(ids))
        end = np.fromiter((p.end for p in proto.pieces), np.int64, len(ids))
        if len(text.encode()) != len(text):  # not ASCII: byte offsets -> character offsets
            starts = np.cumsum([0] + [len(c.encode()) for c in text])
            begin = np.searchsorted(starts, begin, side="right") - 1
            end = np.searchsorted(starts, end, side="left")
        end = np.maximum(end, begin + 1)
        return ids, list(zip(begin.tolist(), end.tolist()))

    def _known(self, i: int) -> bool:
        return i < self.sp.get_piece_size()

    def _decode_run(self, run: list[int]) -> str:
        # sentencepiece drops the leading space of a decoded run; keep it (runs sit between specials).
        text = self.sp.decode(run)
        lead = self.sp.id_to_piece(run[0]).startswith("\u2581")
        return " " + text if lead and not self._dummy_prefix and not text.startswith(" ") else text


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` read with the HF ``tokenizers`` library (Qwen2/2.5/3, Llama-3, Yi, Phi-3)."""

    kind = "tokenizers"

    def __init__(self, tk, specials: dict[str, int], *, bos_id, eos_id, pad_id, unk_id, add_bos: bool) -> None:
        self.tk = tk
        super().__init__(specials, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, unk_id=unk_id, add_bos=add_bos,
                         vocab_size=tk.get_vocab_size(with_added_tokens=True))

    def encode_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # The library splits on its added tokens itself, and a Metaspace "first" prefix must see
        # the whole text, so the text goes in whole.
        enc = self.tk.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def _known(self, i: int) -> bool:
        return self.tk.id_to_token(i) is not None

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(x) for x in ids]
        if all(self._known(i) for i in ids):  # whole, so that a decoder's first-token rule sees the start
            return self.tk.decode(ids, skip_special_tokens=False)
        return super().decode(ids)

    def _decode_run(self, run: list[int]) -> str:
        return self.tk.decode(run, skip_special_tokens=False)


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
    return SentencePieceTokenizer(sp, specials)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot be read as JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_string(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class _FolderFiles:
    """What a tokenizer folder's json files say: added tokens, the named special tokens, add_bos."""

    def __init__(self, folder: Path) -> None:
        from v2pe_megatron.convert.hf_config import special_token_ids

        try:
            self.added = special_token_ids(folder)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise TokenizerError(f"{folder}: its tokenizer files cannot be read ({type(e).__name__}: {e})") from None
        cfg_path, map_path = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
        self.config = _read_json(cfg_path) if cfg_path.is_file() else {}
        smap = _read_json(map_path) if map_path.is_file() else {}
        self.named = {}
        for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
            tok = _token_string(self.config.get(role)) if role in self.config else _token_string(smap.get(role))
            if tok is not None:
                self.named[role] = tok
        self.add_bos_token: Optional[bool] = (bool(self.config["add_bos_token"])
                                              if isinstance(self.config.get("add_bos_token"), bool) else None)


def resolve_tokenizer_file(path: str | Path) -> Path:
    """The file :func:`load_tokenizer` reads for ``path`` (a file, or a folder: ``tokenizer.json``
    before ``tokenizer.model``); TokenizerError when there is none."""
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).is_file():
                return p / name
        raise TokenizerError(f"{p}: no tokenizer.json or tokenizer.model in the folder")
    if not p.is_file():
        raise TokenizerError(f"tokenizer not found: {p}")
    return p


def load_tokenizer(path: str | Path, *, known_added: dict[str, int] | None = None) -> Tokenizer:
    """The tokenizer of a folder or file (see the module docstring for the choice and the ids)."""
    p = resolve_tokenizer_file(path)
    files = _FolderFiles(p.parent)
    if p.suffix == ".json":
        return _load_hf(p, files)
    return _load_sentencepiece(p, files, INTERNVL2_ADDED_TOKENS if known_added is None else known_added)


def _load_hf(p: Path, files: _FolderFiles) -> HFTokenizer:
    from tokenizers import Tokenizer as TkTokenizer

    try:
        tk = TkTokenizer.from_file(str(p))
    except Exception as e:  # the library raises a bare Exception on a malformed file
        raise TokenizerError(f"{p}: cannot be read by the tokenizers library ({e})") from None
    specials = {c: i for c, i in files.added.items()}
    for content, tid in specials.items():
        have = tk.token_to_id(content)
        if have is not None and have != tid:
            raise TokenizerError(f"{p.parent}: the json files give {content!r} the id {tid} but tokenizer.json has "
                                 f"{have}; the folder mixes two tokenizers")
    missing = [t for t in IMAGE_TOKENS if t not in specials]
    if missing:
        raise TokenizerError(f"{p}: no id for {missing}: this is not an InternVL tokenizer (InternVL adds "
                             f"<img>, </img>, <IMG_CONTEXT>); give the HF model's own tokenizer folder")
    # The library must split these out as single ids; a token only the config lists is added.
    unknown = [c for c in specials if tk.token_to_id(c) is None]
    if unknown:
        raise TokenizerError(f"{p}: tokenizer.json lacks the added tokens {unknown} that the json files list")

    def tid(role: str) -> Optional[int]:
        tok = files.named.get(role)
        return None if tok is None else tk.token_to_id(tok)

    bos = tid("bos_token")
    add_bos = files.add_bos_token
    if add_bos is None:  # what the tokenizer's post-processor does itself
        probe = tk.encode("a").ids
        add_bos = bos is not None and bool(probe) and probe[0] == bos
    return HFTokenizer(tk, specials, bos_id=bos, eos_id=tid("eos_token"), pad_id=tid("pad_token"),
                       unk_id=tid("unk_token"), add_bos=add_bos)


def _load_sentencepiece(p: Path, files: _FolderFiles, table: dict[str, int]) -> SentencePieceTokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(p))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{p}: cannot be read as a sentencepiece model ({e})") from None
    specials: dict[str, int] = {}
    for content, tid in files.added.items():
        specials[content] = tid
    for tok in SPECIAL_TOKENS:
        sid = sp.piece_to_id(tok)
        if sid != sp.unk_id() and sp.id_to_piece(sid) == tok:
            specials[tok] = sid  # the model itself knows it (tiny layout)
        elif tok not in specials and tok in table and table[tok] >= sp.get_piece_size():
            specials[tok] = table[tok]
    missing = [t for t in (IM_END, IM_START, IMG_START, IMG_END, IMG_CONTEXT) if t not in specials]
    if missing:
        raise TokenizerError(
            f"{p}: no id for {missing}: put added_tokens.json or tokenizer_config.json (from the HF "
            f"checkpoint) next to the model file")
    # Named tokens: the model's own pieces, else the added tokens.
    def tid(role: str) -> Optional[int]:
        tok = files.named.get(role)
        if tok is None:
            return None
        if tok in specials:
            return specials[tok]
        sid = sp.piece_to_id(tok)
        return sid if sp.id_to_piece(sid) == tok else None

    add_bos = True if files.add_bos_token is None else files.add_bos_token  # InternLM2's tokenizer adds <s>
    return SentencePieceTokenizer(sp, specials, pad_id=tid("pad_token"), add_bos=add_bos,
                                  bos_id=tid("bos_token"), eos_id=tid("eos_token"))


def check_token_ids(recipe: "Recipe", tok: Tokenizer) -> None:
    """The model's image token ids and vocabulary against the tokenizer's; TokenizerError names the
    keys that differ. Part of ``data.chat.check_tokenizer`` (which adds the template's tokens)."""
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


def save_tiny_tokenizer(tok: SentencePieceTokenizer, path: str | Path) -> Path:
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
