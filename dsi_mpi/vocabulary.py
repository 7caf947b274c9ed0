"""Vocabularies as bytes, for a drafter whose tokenizer is not the target's (pure: no torch).

What each token of a tokenizer spells (:class:`Vocabulary`), token sequences with the text they
spell (:class:`Spelled`), and the token-level intersection of two vocabularies
(:func:`shared_tokens`). The translating drafter (``backends/translating.py``) is built on
them; :mod:`dsi_mpi.translate` describes the method and loads a pair from model specs.

Text is bytes. Every token of either vocabulary spells a byte string (``Ġ`` and ``▁`` are
spaces, ``<0xE2>`` is one byte, a special token spells nothing), so a committed text that ends
inside a UTF-8 character (byte-fallback tokens), spaces before punctuation (which ``decode``
"cleans up") and a BOS token (which spells nothing) never disturb the comparison of two texts.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METHODS = ("slem", "tli")  # exact matching / rejection sampling across vocabularies
# TLI is refused below this: the shared tokens as a fraction of the drafter's vocabulary. The
# drafter's mass outside them is lost, so with less in common most drafts are the drafter's
# second choices and acceptance collapses.
MIN_SHARED_FRACTION = 0.25
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_UTF8_LEADS = ((0xE0, 0xC0), (0xF0, 0xE0), (0xF8, 0xF0))  # (mask, lead byte): 2, 3, 4 bytes
_LAST_SPACE_RUN = re.compile(rb"\s+(?=\S*\Z)")  # the last run of whitespace
_STRAY_BYTE = re.compile("[\udc80-\udcff]")  # surrogateescape's spelling of a stray byte


def method_for(verify: str) -> str:
    """The translation a verification mode gets when the vocabularies differ."""
    return "tli" if verify == "rejection" else "slem"


# ----------------------------------------------------------------- vocabularies as bytes


def _decoder_kind(tokenizer: Any) -> tuple[str, list[tuple[str, str]], bool]:
    """How a fast tokenizer's decoder spells tokens: ``byte_level``, or ``pieces`` with its
    string replacements (``▁`` -> space) and whether ``<0xXX>`` tokens are bytes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: "
                         "cannot read how it spells tokens")
    spec = json.loads(backend.to_str()).get("decoder") or {}
    parts = spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = {part.get("type") for part in parts}
    if "ByteLevel" in kinds:
        return "byte_level", [], False
    supported = {"Replace", "ByteFallback", "Fuse", "Strip", "Metaspace", None}
    if not kinds <= supported:
        raise ValueError(f"cannot translate a tokenizer whose decoder is "
                         f"{sorted(k for k in kinds if k)}: byte-level BPE and "
                         "sentencepiece-style tokenizers are supported")
    replacements = []
    for part in parts:
        if part.get("type") == "Replace":
            pattern = part.get("pattern", {})
            if "String" not in pattern:
                raise ValueError("cannot translate a tokenizer whose decoder replaces "
                                 "a regular expression")
            replacements.append((pattern["String"], part.get("content", "")))
        elif part.get("type") == "Metaspace":
            replacements.append((part.get("replacement", "\u2581"), " "))
    return "pieces", replacements, "ByteFallback" in kinds


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer as bytes: what each token id spells, and text (bytes) to token ids.

    ``pieces[i]`` is None for a special token (BOS, EOS, padding, control tokens), which
    spells no text; ids past the tokenizer (a model's padding rows) are None too."""

    tokenizer: Any  # a transformers fast tokenizer
    pieces: tuple[bytes | None, ...]  # [model vocabulary size]
    byte_ids: dict[int, int]  # a byte value -> a token spelling exactly that byte
    prefix: tuple[int, ...]  # special tokens the tokenizer puts before a text (BOS)
    eos_ids: frozenset[int]

    @classmethod
    def of(cls, tokenizer: Any, size: int | None = None,  # a fast tokenizer
           eos_ids: Iterable[int] = ()) -> Vocabulary:
        """The vocabulary of a fast tokenizer, sized to the model's ``size`` rows (default: the
        tokenizer's length); ``eos_ids`` adds the model's own end-of-sequence ids."""
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        kind, replacements, byte_fallback = _decoder_kind(tokenizer)
        n = len(tokenizer)
        size = max(size or n, n)
        names = tokenizer.convert_ids_to_tokens(list(range(n)))
        added = getattr(tokenizer, "added_tokens_decoder", {})
        special = {i for i, tok in added.items() if getattr(tok, "special", False)}
        special |= set(getattr(tokenizer, "all_special_ids", ()))
        unspell = {ch: b for b, ch in bytes_to_unicode().items()}
        pieces: list[bytes | None] = [None] * size
        byte_ids: dict[int, int] = {}
        for i, name in enumerate(names):
            if i in special or name is None:
                continue
            if i in added:  # an added text token spells its content as written
                piece = added[i].content.encode("utf-8")
            elif kind == "byte_level":
                piece = b"".join(bytes([unspell[c]]) if c in unspell else c.encode("utf-8")
                                 for c in name)
            elif byte_fallback and (m := _BYTE_TOKEN.match(name)):
                piece = bytes([int(m.group(1), 16)])
                byte_ids.setdefault(piece[0], i)  # a byte token, unless a plain token spells it
                pieces[i] = piece
                continue
            else:
                for old, new in replacements:
                    name = name.replace(old, new)
                piece = name.encode("utf-8")
            pieces[i] = piece
            if len(piece) == 1:
                byte_ids[piece[0]] = i
        with_specials = list(tokenizer("a", add_special_tokens=True)["input_ids"])
        first_text = next((k for k, t in enumerate(with_specials) if t not in special),
                          len(with_specials))
        eos = set(eos_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        return cls(tokenizer, tuple(pieces), byte_ids, tuple(with_specials[:first_text]),
                   frozenset(eos))

    @property
    def size(self) -> int:
        return len(self.pieces)

    def piece(self, token: int) -> bytes:
        """What ``token`` spells (nothing for a special token)."""
        return (self.pieces[token] or b"") if 0 <= token < len(self.pieces) else b""

    def spell(self, tokens: Sequence[int]) -> bytes:
        return b"".join(self.piece(int(t)) for t in tokens)

    def encode(self, data: bytes) -> list[int]:
        """Token ids for ``data`` with no special tokens added (no BOS mid-stream): valid UTF-8
        through the tokenizer, any other byte as the token that spells it (if there is one)."""
        out: list[int] = []
        text = data.decode("utf-8", "surrogateescape")
        start = 0
        for stray in _STRAY_BYTE.finditer(text):  # a byte that is not UTF-8 where it stands
            out += self._encode_text(text[start: stray.start()])
            byte = self.byte_ids.get(ord(stray.group()) - 0xDC00)
            if byte is not None:
                out.append(byte)
            start = stray.end()
        return out + self._encode_text(text[start:])

    def _encode_text(self, text: str) -> list[int]:
        if not text:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return list(backend.encode(text, add_special_tokens=False).ids)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_after(self, anchor: bytes, data: bytes) -> list[int]:
        """Token ids for ``data`` as it would be tokenized after ``anchor`` (the end of the text
        before it): a tokenizer that adds a space before a text, or splits words by what
        precedes them, sees the context. Falls back to ``data`` alone when no token boundary
        falls where ``data`` begins."""
        if anchor:
            ids = self.encode(anchor + data)
            spelled = self.spell(ids)
            if spelled.endswith(anchor + data):
                boundary, offset = len(spelled) - len(data), 0
                for k, token in enumerate(ids):
                    if offset == boundary:
                        if self.spell(ids[k:]) == data:
                            return ids[k:]
                        break
                    offset += len(self.piece(token))
                    if offset > boundary:
                        break
        return self.encode(data)


class Spelled:
    """Tokens of one vocabulary and the bytes they spell, with the byte offset where each token
    ends: the target's context and the drafter's own tokens are both kept as one."""

    def __init__(self, vocabulary: Vocabulary) -> None:
        self.vocabulary = vocabulary
        self.tokens: list[int] = []
        self.ends: list[int] = []  # ends[k]: bytes spelled by tokens[: k + 1]
        self.text = b""

    def __len__(self) -> int:
        return len(self.tokens)

    def end(self, count: int) -> int:
        """Bytes spelled by the first ``count`` tokens."""
        return self.ends[count - 1] if count else 0

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            self.tokens.append(t)
            self.text += self.vocabulary.piece(t)
            self.ends.append(len(self.text))

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens and the text they spell."""
        del self.tokens[length:]
        del self.ends[length:]
        self.text = self.text[: self.end(len(self.ends))]

    def inside(self, length: int) -> int:
        """How many leading tokens lie wholly inside the first ``length`` bytes (a token that
        spells nothing and stands at ``length`` is not inside: the text may go on without it)."""
        ends = self.ends
        k = bisect.bisect_right(ends, length)
        while k and ends[k - 1] == length and (ends[k - 2] if k > 1 else 0) == length:
            k -= 1
        return k


def incomplete_tail(data: bytes) -> int:
    """Bytes at the end of ``data`` that start a UTF-8 character not yet complete (0..3)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: a lead byte or ASCII
            leads = enumerate(_UTF8_LEADS, 2)
            need = next((n for n, (mask, lead) in leads if byte & mask == lead), 1)
            return back if need > back else 0
    return 0


def last_word_start(data: bytes) -> int:
    """Where the last run of whitespace in ``data`` begins (0 when there is none)."""
    match = _LAST_SPACE_RUN.search(data)
    return match.start() if match else 0


def shared_tokens(source: Vocabulary, target: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """Token-level intersection: parallel arrays of drafter ids and the target ids that spell
    the same bytes (several drafter ids may share one target id). Among target tokens that
    spell the same bytes, a plain token is preferred to a byte-fallback one."""
    by_bytes: dict[bytes, int] = {}
    fallback = set(target.byte_ids.values())
    for t, piece in enumerate(target.pieces):
        if piece and (piece not in by_bytes or by_bytes[piece] in fallback and t not in fallback):
            by_bytes[piece] = t
    pairs = [(d, by_bytes[p]) for d, p in enumerate(source.pieces) if p and p in by_bytes]
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    d_ids, t_ids = zip(*pairs, strict=True)
    return np.asarray(d_ids, dtype=np.int64), np.asarray(t_ids, dtype=np.int64)


def same_vocabulary(target_tokenizer: Any, drafter_tokenizer: Any) -> bool:
    """The same tokens under the same ids: no translation needed."""
    return bool(target_tokenizer.get_vocab() == drafter_tokenizer.get_vocab())


def check_intersection(source: Vocabulary, target: Vocabulary) -> float:
    """The fraction of the drafter's text tokens that the target's vocabulary shares; ValueError
    when it is below :data:`MIN_SHARED_FRACTION` (TLI would accept almost nothing)."""
    d_ids, _ = shared_tokens(source, target)
    texts = sum(1 for p in source.pieces if p)
    fraction = len(d_ids) / texts if texts else 0.0
    if fraction < MIN_SHARED_FRACTION:
        raise ValueError(
            f"--verify rejection across vocabularies samples drafts from the tokens both "
            f"vocabularies share; these share {len(d_ids)} of the drafter's {texts} tokens "
            f"({fraction:.0%}, below {MIN_SHARED_FRACTION:.0%}): use --verify exact (string-level "
            "exact matching) or another drafter"
        )
    return fraction
