"""A drafter with its own vocabulary, seen by DSI as a drafter of the target's tokens.

Lossless speculative decoding across vocabularies (Timor et al., ICML 2025, arXiv 2502.05202),
on the drafter's side only: the coordinator and the target servers speak target tokens and
never learn that the drafter does not. :class:`TranslatingDrafter` is a :class:`Backend` whose
positions and tokens are the target's; the drafter's model, cache and tokenizer live inside it.

Text is bytes. Every token of either vocabulary spells a byte string (:class:`Vocabulary`:
``Ġ`` and ``▁`` are spaces, ``<0xE2>`` is one byte, a special token spells nothing), so a
committed text that ends inside a UTF-8 character (byte-fallback tokens), spaces before
punctuation (which ``decode`` "cleans up") and a BOS token (which spells nothing) never
disturb the comparison of two texts.

- **Exact matching across vocabularies** (the paper's string-level exact match, SLEM; greedy
  and shared-noise sampling): the drafter drafts text with its own tokens; the text beyond
  the target's context is re-tokenized with the target's tokenizer (no special tokens: no BOS
  mid-stream) and its first token is the draft. The last token of that text is held back,
  since more text can move its boundary (``" hel"`` is not the start of ``" hello"`` for the
  target), so the drafter runs on until the text holds two target tokens. The target verifies
  token ids as always, so the output is the target's exactly.
- **Rejection sampling across vocabularies** (the paper's token-level intersection, TLI): the
  drafter's distribution restricted to the tokens both vocabularies spell alike, renormalised
  and written over the target's vocabulary, is a distribution ``q`` over the target's tokens;
  the draft is a sample of it, and Leviathan et al.'s rule keeps the output distributed as
  the target's. :func:`check_intersection` refuses a pair that shares too little.

After each change of the target's context (a commit, a rollback) the drafter syncs to the
context's text: it keeps its tokens that agree with the text (cropping its cache after the
last one), and encodes the rest of the text with its own tokenizer, after the last kept token.
"""

from __future__ import annotations

import bisect
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dsi_mpi.backends.base import Backend, StepOutput
from dsi_mpi.verify import SamplingParams, sample_from

METHODS = ("slem", "tli")  # exact matching / rejection sampling across vocabularies
# TLI is refused below this: the shared tokens as a fraction of the drafter's vocabulary. The
# drafter's mass outside them is lost, so with less in common most drafts are the drafter's
# second choices and acceptance collapses.
MIN_SHARED_FRACTION = 0.25
MAX_DRAFTER_FORWARDS = 16  # drafter tokens per target draft, at most (a bound, not a tuning knob)
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_UTF8_LEADS = ((0xE0, 0xC0), (0xF0, 0xE0), (0xF8, 0xF0))  # (mask, lead byte): 2, 3, 4 bytes
_LAST_SPACE_RUN = re.compile(rb"\s+(?=\S*\Z)")  # the last run of whitespace
_STRAY_BYTE = re.compile("[\udc80-\udcff]")  # surrogateescape's spelling of a stray byte


def method_for(verify: str) -> str:
    """The translation a verification mode gets when the vocabularies differ."""
    return "tli" if verify == "rejection" else "slem"


# ----------------------------------------------------------------- vocabularies as bytes


def _decoder_kind(tokenizer) -> tuple[str, list[tuple[str, str]], bool]:
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

    tokenizer: object
    pieces: tuple[bytes | None, ...]  # [model vocabulary size]
    byte_ids: dict[int, int]  # a byte value -> a token spelling exactly that byte
    prefix: tuple[int, ...]  # special tokens the tokenizer puts before a text (BOS)
    eos_ids: frozenset[int]

    @classmethod
    def of(cls, tokenizer, size: int | None = None,  # a fast tokenizer
           eos_ids: Sequence[int] = ()) -> Vocabulary:
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


def incomplete_tail(data: bytes) -> int:
    """Bytes at the end of ``data`` that start a UTF-8 character not yet complete (0..3)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: a lead byte or ASCII
            leads = enumerate(_UTF8_LEADS, 2)
            need = next((n for n, (mask, lead) in leads if byte & mask == lead), 1)
            return back if need > back else 0
    return 0


def _last_word_start(data: bytes) -> int:
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


def same_vocabulary(target_tokenizer, drafter_tokenizer) -> bool:
    """The same tokens under the same ids: no translation needed."""
    return target_tokenizer.get_vocab() == drafter_tokenizer.get_vocab()


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


# ----------------------------------------------------------------- the translating drafter


class TranslatingDrafter(Backend):
    """The drafter's model behind the target's vocabulary (the design is the module's).

    Its cache, as the :class:`Backend` interface sees it, holds target tokens
    (``self.tokens``); the drafter's own tokens (``self.drafted``) are what its model's cache
    holds, plus at most one chosen token not yet fed (``self._next``). The drafter's text may
    run ahead of the target's context: that is the text not yet turned into drafts.

    ``drafter`` must offer ``forward_logits`` (the HF backend does). ``forward`` returns one
    target token (a draft) per call, with its distribution over the target's vocabulary when
    ``want_probs`` (TLI)."""

    def __init__(self, drafter: Backend, source: Vocabulary, target: Vocabulary,
                 target_eos: frozenset[int] = frozenset(),
                 max_forwards: int = MAX_DRAFTER_FORWARDS) -> None:
        self.drafter = drafter
        self.source, self.target = source, target
        self.vocab_size = target.size
        self.eos_token_ids = frozenset(target_eos) or target.eos_ids
        self.max_positions = drafter.max_positions
        self.max_forwards = max_forwards
        eos = getattr(target.tokenizer, "eos_token_id", None)
        self._eos = eos if eos in self.eos_token_ids else min(self.eos_token_ids, default=0)
        self._shared: tuple[np.ndarray, np.ndarray] | None = None  # TLI's map, made on first use
        # The target's side: tokens, and the byte offset where each one ends.
        self.tokens: list[int] = []
        self._ends: list[int] = []
        self._text = b""
        # The drafter's side: tokens in its cache, their ends, its logits after them, and the
        # token it chose next (not fed yet); ``_agree`` leading tokens lie inside the target's
        # text and spell it.
        self.drafted: list[int] = []
        self._d_ends: list[int] = []
        self._d_text = b""
        self._logits = None  # torch [vocab_d], after self.drafted
        self._next: int | None = None
        self._agree = 0
        self.drafter_forwards = 0  # the drafter model's forwards
        self.timed = False  # profile: also time them (synchronising a GPU), in model_seconds
        self.model_seconds = 0.0

    # ----------------------------------------------------------------- Backend

    @property
    def device(self):  # what profile synchronises on
        return getattr(self.drafter, "device", None)

    @property
    def config(self):  # the drafter's model config (its layer count, for profile)
        return getattr(self.drafter, "config", None)

    def cached_length(self) -> int:
        return len(self.tokens)

    def crop(self, length: int) -> None:
        """Keep the first ``length`` target tokens; the drafter's cache syncs lazily, at the next
        forward, to whatever the context then is."""
        if length >= len(self.tokens):
            return
        del self.tokens[length:]
        del self._ends[length:]
        self._text = self._text[: self._ends[-1]] if self._ends else b""
        self._agree = min(self._agree, self._inside(len(self._text)))

    def reset(self) -> None:
        self.crop(0)
        self.drafter.reset()
        self._crop_drafter(0)

    def forward(self, tokens: Sequence[int], params: SamplingParams, num_outputs: int | None = None,
                want_probs: bool = False,
                should_cancel: Callable[[], bool] | None = None) -> StepOutput:
        if not tokens:
            raise ValueError("forward needs at least one token")
        if (num_outputs if num_outputs is not None else len(tokens)) != 1:
            raise ValueError("a translating drafter drafts one token per forward (num_outputs=1)")
        tokens = [int(t) for t in tokens]
        text = self._text + self.target.spell(tokens)
        anchor = self.target.piece(tokens[-1])
        position = len(self.tokens) + len(tokens)
        self._sync(text, exact=want_probs, should_cancel=should_cancel)
        probs = None
        if want_probs:
            token, probs = self._draft_shared(params, position)
        else:
            token = self._draft_text(text, anchor, params, should_cancel)
        # Only now is the context the backend's: a cancelled forward leaves it as it was.
        for t in tokens:
            self.tokens.append(t)
            self._ends.append((self._ends[-1] if self._ends else 0) + len(self.target.piece(t)))
        self._text = text
        self._agree = self._inside(len(text))
        return StepOutput(position, np.asarray([token], dtype=np.int64), probs)

    # ----------------------------------------------------------------- the drafter's side

    def _crop_drafter(self, length: int) -> None:
        """Keep the drafter's first ``length`` tokens, and no chosen token."""
        self._next = None
        if length < len(self.drafted):
            self.drafter.crop(length)
            del self.drafted[length:]
            del self._d_ends[length:]
            self._d_text = self._d_text[: self._d_ends[-1]] if self._d_ends else b""
            self._logits = None
            self._agree = min(self._agree, length)

    def _feed(self, tokens: list[int], should_cancel: Callable[[], bool] | None) -> None:
        """Append ``tokens`` to the drafter's cache and keep its logits after them."""
        start = time.perf_counter() if self.timed else 0.0
        logits = self.drafter.forward_logits(tokens, num_outputs=1, should_cancel=should_cancel)
        self.drafter_forwards += 1
        if self.timed:
            device = getattr(logits, "device", None)
            if device is not None and device.type == "cuda":
                import torch

                torch.cuda.synchronize(device)
            self.model_seconds += time.perf_counter() - start
        for t in tokens:
            self.drafted.append(t)
            self._d_text += self.source.piece(t)
            self._d_ends.append(len(self._d_text))
        self._logits = logits[-1]
        self._next = None

    def _inside(self, length: int) -> int:
        """How many of the drafter's leading tokens lie wholly inside the first ``length`` bytes
        (a token that spells nothing and stands at ``length`` is not inside: the text may go on
        without it)."""
        k = bisect.bisect_right(self._d_ends, length)
        ends = self._d_ends
        while k and ends[k - 1] == length and (ends[k - 2] if k > 1 else 0) == length:
            k -= 1
        return k

    def _agrees(self, index: int, token: int, start: int, text: bytes) -> bool:
        """Whether drafter token ``token``, the ``index``-th, spelling from byte ``start``, agrees
        with the target's ``text``: it starts beyond it, or spells what the text has there."""
        if start >= len(text):
            return True
        piece = self.source.pieces[token] if 0 <= token < self.source.size else None
        if piece is None:  # a special token: the tokenizer's own BOS at the start, nothing else
            return index < len(self.source.prefix) and token == self.source.prefix[index]
        return text.startswith(piece[: len(text) - start], start)

    def _sync(self, text: bytes, exact: bool, should_cancel: Callable[[], bool] | None) -> None:
        """Make the drafter's tokens spell ``text``, and maybe more: keep the leading ones that
        agree with it (crop the drafter's cache after them), encode the rest of the text after
        them and feed it. ``exact`` (TLI) drops the tokens that run past the text too, and
        leaves no chosen token unfed: the drafter's logits must follow the text exactly."""
        chosen = self.drafted + ([self._next] if self._next is not None else [])
        ends = self._d_ends + ([len(self._d_text) + len(self.source.piece(self._next))]
                               if self._next is not None else [])
        m = min(self._agree, self._inside(len(self._text)))
        while m < len(chosen) and self._agrees(m, chosen[m], ends[m - 1] if m else 0, text):
            m += 1
        if exact:
            while m and ends[m - 1] > len(text):
                m -= 1
        covered = ends[m - 1] if m else 0
        pending = chosen[len(self.drafted)] if m == len(chosen) > len(self.drafted) else None
        self._crop_drafter(min(m, len(self.drafted)))  # drops the chosen token too
        feed: list[int] = []
        if pending is not None:
            if covered < len(text) or exact:
                feed.append(pending)
            else:
                self._next = pending  # the drafter's text reaches the end of the context or beyond
        if not self.drafted and not feed:
            feed = list(self.source.prefix)
        if covered < len(text):
            last = feed[-1] if feed else self.drafted[-1] if self.drafted else None
            anchor = b"" if last is None else self.source.piece(last)
            feed += self.source.encode_after(anchor, text[covered:])
        if feed:
            self._feed(feed, should_cancel)
        elif self._logits is None and self._next is None:
            self._refeed(should_cancel)
        self._agree = self._inside(len(self._text))

    def _refeed(self, should_cancel: Callable[[], bool] | None) -> None:
        """Logits after the drafter's tokens when none are kept: feed the last token again."""
        if self.drafted:
            last = self.drafted[-1]
            self._crop_drafter(len(self.drafted) - 1)
            self._feed([last], should_cancel)
        else:  # nothing to feed at all (an empty text, no BOS): start from the drafter's EOS
            self._feed([min(self.source.eos_ids, default=0)], should_cancel)

    # ----------------------------------------------------------------- drafting

    def _draft_text(self, text: bytes, anchor: bytes, params: SamplingParams,
                    should_cancel: Callable[[], bool] | None) -> int:
        """SLEM: the first target token of the drafter's text beyond ``text``, once it is stable:
        it ends where the last run of whitespace in that text begins (words before it are
        complete; a target token ending inside a word can still merge with what comes, as
        ``" spec"`` does into ``" speculative"``), or the drafter's text ended with its EOS, or
        :attr:`max_forwards` drafter tokens were drafted for it."""
        from dsi_mpi.backends.logits import select_tokens

        ids: list[int] = []
        for forwards in range(self.max_forwards + 1):
            if self._next is None:
                self._next = int(select_tokens(self._logits[None], len(self.drafted), params)[0])
            final = self._next in self.source.eos_ids
            ahead = self._d_text + (b"" if final else self.source.piece(self._next))
            if len(ahead) < len(text):
                return self._eos  # bytes the drafter has no token for: it cannot follow this text
            ahead = ahead[len(text):]
            if not final:
                ahead = ahead[: len(ahead) - incomplete_tail(ahead)]
            ids = self.target.encode_after(anchor, ahead) if ahead else []
            if final:
                return ids[0] if ids else self._eos
            if ids and len(self.target.piece(ids[0])) <= _last_word_start(ahead):
                return ids[0]
            if forwards < self.max_forwards:
                self._feed([self._next], should_cancel)
        return ids[0] if ids else self._eos

    def _draft_shared(self, params: SamplingParams, position: int) -> tuple[int, np.ndarray]:
        """TLI: a sample of the drafter's distribution over the shared tokens, as target ids;
        returns the token and that distribution, ``[1, target vocabulary]``."""
        import torch

        from dsi_mpi.backends.logits import distributions

        if self._shared is None:
            d_ids, t_ids = shared_tokens(self.source, self.target)
            # The end of the text is shared too: the drafter's EOS drafts the target's.
            ends = sorted(e for e in self.source.eos_ids if 0 <= e < self.source.size)
            self._shared = (np.concatenate([d_ids, np.asarray(ends, dtype=np.int64)]),
                            np.concatenate([t_ids, np.full(len(ends), self._eos, dtype=np.int64)]))
        d_ids, t_ids = self._shared
        logits = self._logits.detach().to("cpu", torch.float64)
        masked = torch.full_like(logits, float("-inf"))
        index = torch.from_numpy(d_ids)
        masked[index] = logits[index]  # the drafter's tokens the target lacks get no mass
        q_d = distributions(masked[None], params)[0].numpy()  # [vocab_d]
        q = np.zeros(self.target.size, dtype=np.float64)
        np.add.at(q, t_ids, q_d[d_ids])
        token = int(np.argmax(q)) if params.greedy else sample_from(q, params.seed, position)
        # The drafter's text goes on with a token that spells the draft: its most likely one.
        candidates = d_ids[t_ids == token]
        self._next = int(candidates[np.argmax(q_d[candidates])])
        return token, q[None]


# ----------------------------------------------------------------- from model specs


def _tokenizer(spec: str):  # a transformers tokenizer or None
    from dsi_mpi.backends import is_emulated, is_self_drafter

    if is_emulated(spec) or is_self_drafter(spec):
        return None  # an emulated pair shares its vocabulary; a self-drafter is the target's
    from dsi_mpi.backends.hf import load_tokenizer

    return load_tokenizer(spec)


def vocabularies_differ(target: str, drafter: str) -> bool:
    """Whether a drafter spec needs translating to the target spec's vocabulary (both models
    ship tokenizers and their vocabularies differ)."""
    t, d = _tokenizer(target), _tokenizer(drafter)
    return t is not None and d is not None and not same_vocabulary(t, d)


def translation(target: str, drafter: str | None, verify: str) -> str | None:
    """The method a pair of specs gets: None when the drafter speaks the target's vocabulary,
    else ``slem`` (``--verify exact``) or ``tli`` (``--verify rejection``)."""
    if drafter is None or not vocabularies_differ(target, drafter):
        return None
    return method_for(verify)


def load_drafter(spec: str, target: str, dtype: str = "auto", device: str = "cpu",
                 target_eos: frozenset[int] = frozenset(), engine: object = "eager") -> Backend:
    """The drafter for ``target``: its backend, behind a :class:`TranslatingDrafter` when its
    vocabulary is not the target's. ``target_eos``: the target's end-of-sequence ids (what a
    draft that ends the text becomes), default its tokenizer's. ``engine``: how its forwards
    run (``backends/engine.py``)."""
    from dsi_mpi.backends import load_backend

    backend = load_backend(spec, dtype, device, target=target, engine=engine)
    t_tok, d_tok = _tokenizer(target), _tokenizer(spec)
    if t_tok is None or d_tok is None or same_vocabulary(t_tok, d_tok):
        return backend
    from dsi_mpi.backends.hf import load_config

    config = load_config(target)
    size = int(getattr(config.get_text_config(), "vocab_size", None) or len(t_tok))
    source = Vocabulary.of(d_tok, backend.vocab_size, backend.eos_token_ids)
    return TranslatingDrafter(backend, source, Vocabulary.of(t_tok, size, tuple(target_eos)),
                              target_eos)
