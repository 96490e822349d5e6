"""A chat's OpenAI `logprobs` (`POST /v1/chat/completions` with `logprobs`): each token of its
reply's text with its logprob (the model's own, as a SampleResponse's `logprobs`), its text, its
bytes, and the likeliest tokens in its place (`top_logprobs`, where asked).

Which tokens: those of the content, as `chat_text` decodes it. A special token (the end of
sequence or of turn that ends the reply, or any other the decoding skips) has no entry, nor has
a token from the stop string on, which the content leaves out.

A token's text is what it adds to the content, so the tokens' texts joined are the content
(the last may run on into the stop string the content ends before, as OpenAI's does; and a
tokenizer that cleans up spaces, " ." read as ".", is read as it goes, not as it ends). Where a
character is split across tokens (an emoji or a CJK character a byte-level or byte-fallback
tokenizer writes in several), the tokens before the last of it add nothing, and the last adds
the character; a SentencePiece token's word-leading space is kept (decoded alone, it is
dropped) except where the content itself begins. Each is read incrementally, as vLLM's
detokenizer reads a stream: off a window from the text's step before last, so the texts of a
reply of n tokens cost about 2n small decodes. Whether a token leaves a character pending is
read off the tokens' own bytes as the tokenizer's decoder reads them (`_held`), so bytes that
are no UTF-8 read as the content reads them: one U+FFFD where a byte-level decoder puts one,
a whole run of fallback bytes as U+FFFDs where the byte-fallback decoder turns it so.

A token's bytes are its own where the tokenizer has them: a byte-level BPE token's characters
each stand for a byte (GPT-2's, Llama 3's, SmolLM2's), a byte-fallback token (`<0xF0>`) is its
byte. So the bytes joined are the content's, a split character's bytes spread over its tokens
as they came (but for a byte the content cannot hold, U+0000, and a character the reply never
finished, which the content shows as U+FFFD). Elsewhere (a word piece, an added token) they are
its text's UTF-8.
"""

from __future__ import annotations

import bisect
import codecs
import itertools
import json
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

PENDING = 4  # tokens a character may be written in (UTF-8's most bytes); past it, flushed
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def content_logprobs(
    sequence: dict[str, Any], cut: int | None, tokenizer: PreTrainedTokenizerBase
) -> list[dict[str, Any]]:
    """OpenAI's `logprobs.content` of a chat reply's sequence (its tokens, their logprobs and,
    where asked, `topk_logprobs`) whose text is cut at `cut` (a stop string's start; None: the
    whole text)."""
    pieces = _pieces(tokenizer)
    tokens = sequence["tokens"]
    kept = [i for i, token in enumerate(tokens) if token not in pieces.special]
    raw = [pieces.raw(tokens[i]) for i in kept]
    content: list[dict[str, Any]] = []
    length = 0  # of the content so far
    for i, own, text in zip(kept, raw, pieces.texts([tokens[i] for i in kept], raw), strict=True):
        if cut is not None and length >= cut:
            break  # the stop string's, left out of the text
        length += len(text)
        content.append(_entry(pieces, sequence, i, own, text))
    return content


def token_string(tokenizer: PreTrainedTokenizerBase, token: int) -> str:
    """A token's text decoded alone (its leading space kept), as an alternative's."""
    return str(_pieces(tokenizer).alone(token)["token"])


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokens a text's decoding skips: the special ones, and added tokens marked so."""
    return _pieces(tokenizer).special


def _entry(
    pieces: _Pieces, sequence: dict[str, Any], i: int, own: bytes | None, text: str
) -> dict[str, Any]:
    """The entry of the sequence's `i`th token, which adds `text` (`own`: its own bytes)."""
    top = sequence.get("topk_logprobs")
    alternatives = [{**pieces.alone(t), "logprob": lp} for t, lp in (top[i] if top else [])]
    return {
        "token": text,
        "logprob": sequence["logprobs"][i],
        "bytes": _bytes(own, text),
        "top_logprobs": alternatives,
    }


class GrowingContent:
    """The `logprobs.content` of a streamed chat's reply while it is sampled (a row's): each
    token read once, as `content_logprobs` reads it in the whole reply, as soon as nothing
    sampled later can change it: every token but the last (which the whole reading flushes), and
    where fallback bytes run on, none of the run (the decoder reads a run whole).
    `read(sequence, sure)` gives the entries so far whose texts join into at most the first
    `sure` characters of the text (`chat_text_so_far`'s, which the whole text begins with) and
    none past them (an empty entry where they end may be a stop string's)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.pieces = _pieces(tokenizer)
        self.seen = 0  # the sequence's tokens looked at
        self.places: list[int] = []  # those not special: where each is in the sequence
        self.ids: list[int] = []
        self.raw: list[bytes | None] = []
        self.held: list[bool] = []  # settled, for the first of them
        self.run: list[bytes] = []  # fallback bytes whose run has not ended
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.reading = _Reading(self.pieces)
        self.entries: list[dict[str, Any]] = []
        self.starts: list[int] = []  # where each entry's text begins in the text, and ends
        self.ends: list[int] = []

    def read(self, sequence: dict[str, Any], sure: int) -> list[dict[str, Any]]:
        tokens, pieces = sequence["tokens"], self.pieces
        for place in range(self.seen, len(tokens)):
            if tokens[place] not in pieces.special:
                self.places.append(place)
                self.ids.append(tokens[place])
                self.raw.append(pieces.raw(tokens[place]))
        self.seen = len(tokens)
        bytewise = pieces.byte_level or pieces.byte_fallback
        settled = self._settle() if bytewise else len(self.ids)
        while len(self.entries) < min(settled, len(self.ids) - 1):
            k = len(self.entries)
            self.reading.step(self.ids, self.held[k] if bytewise else None, last=False)
            text = self.reading.texts[k]
            self.entries.append(_entry(pieces, sequence, self.places[k], self.raw[k], text))
            start = self.ends[-1] if self.ends else 0
            self.starts.append(start)
            self.ends.append(start + len(text))
        sent = min(bisect.bisect_right(self.ends, sure), bisect.bisect_left(self.starts, sure))
        return self.entries[:sent]

    def _settle(self) -> int:
        """How many of the tokens have their `held` settled, read as `_Pieces._held` reads the
        whole reply: byte-level bytes as they come, through one decoder a run; a run of fallback
        bytes once it has ended."""
        for own in self.raw[len(self.held) + len(self.run) :]:
            if own is None:  # a run of bytes ends: `_held` reads each run apart
                if self.run:
                    self.held += self.pieces._held(self.run) or []
                    self.run = []
                self.decoder.reset()
                self.held.append(False)
            elif self.pieces.byte_fallback:
                self.run.append(own)
            else:
                self.decoder.decode(own)
                self.held.append(bool(self.decoder.getstate()[0]))
        return len(self.held)


class _Pieces:
    """One tokenizer's reading of tokens as OpenAI's logprobs give them."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        try:
            described = json.loads(decoder.__getstate__()) if decoder is not None else {}
        except Exception:  # a decoder of the tokenizer's own: bytes from its texts
            described = {}
        self.byte_level = _holds(described, "ByteLevel")
        self.byte_fallback = _holds(described, "ByteFallback")
        self.bytes_of = {char: byte for byte, char in bytes_to_unicode().items()}
        decoded = getattr(tokenizer, "added_tokens_decoder", {})
        self.added_ids = set(decoded)
        # What the content's decoding skips: the special tokens, and added tokens marked so.
        self.special = set(tokenizer.all_special_ids) | {i for i, t in decoded.items() if t.special}
        # A plain token to read another after, so that its word-leading space stays.
        self.anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
        self.known: dict[int, dict[str, Any]] = {}  # each alternative's text and bytes

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).replace("\x00", "")

    def texts(self, tokens: list[int], raw: list[bytes | None]) -> list[str]:
        """What each token (none special; `raw`: each one's own bytes) adds to the text
        (`_Reading`)."""
        held = self._held(raw)
        reading = _Reading(self)
        for i in range(len(tokens)):
            reading.step(tokens, held[i] if held is not None else None, i + 1 == len(tokens))
        return reading.texts

    def _held(self, raw: Sequence[bytes | None]) -> list[bool] | None:
        """Whether each token (by its own bytes, `raw`) leaves a character pending, read as
        the decoder reads the bytes: byte-level bytes run through one lossy UTF-8 decoder; a
        run of fallback bytes decoded at once, a run that is not UTF-8 (each of its bytes then
        U+FFFD) held to its last byte. None where the tokenizer has no bytes of its own (a
        character is then pending while the text ends in U+FFFD, for at most PENDING
        tokens)."""
        if not (self.byte_level or self.byte_fallback):
            return None
        held: list[bool] = []
        for has_bytes, grouped in itertools.groupby(raw, key=lambda own: own is not None):
            tokens = list(grouped)
            run = [own for own in tokens if own is not None]
            if not has_bytes:  # word pieces or added tokens: no character runs through them
                held += [False] * len(tokens)
            elif self.byte_fallback and not _utf8(b"".join(run)):
                held += [True] * (len(run) - 1) + [False]  # the decoder reads it as one
            else:
                reader = codecs.getincrementaldecoder("utf-8")("replace")
                for own in run:
                    reader.decode(own)
                    held.append(bool(reader.getstate()[0]))
        return held

    def raw(self, token: int) -> bytes | None:
        """The token's own bytes (a byte-level token's, a fallback byte), else None."""
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if not isinstance(piece, str) or token in self.added_ids:
            return None
        if self.byte_level and all(char in self.bytes_of for char in piece):
            return bytes(self.bytes_of[char] for char in piece)
        byte = _BYTE_PIECE.fullmatch(piece) if self.byte_fallback else None
        return bytes([int(byte.group(1), 16)]) if byte is not None else None

    def alone(self, token: int) -> dict[str, Any]:
        """A token's text in no context (an alternative in its place: its leading space kept)
        and its bytes."""
        if token not in self.known:
            if self.byte_level or not self.anchor:
                text = self.tokenizer.decode([token])
            else:
                anchor = self.tokenizer.decode(self.anchor)
                text = self.tokenizer.decode([*self.anchor, token]).removeprefix(anchor)
            text = text.replace("\x00", "")
            own = self.raw(token)
            self.known[token] = {"token": text, "bytes": _bytes(own, text)}
        return self.known[token]


class _Reading:
    """A reply's tokens read one by one into what each adds to the text, as vLLM's detokenizer
    reads a stream: off a window from the text's last step but one; a token that leaves a
    character pending (`held`, else the window ends in U+FFFD for fewer than PENDING tokens)
    adds nothing until the character is whole, or the reply ends (`last`)."""

    def __init__(self, pieces: _Pieces) -> None:
        self.pieces = pieces
        self.texts: list[str] = []
        self.start = self.read = 0  # the window's first token, and the first not yet read

    def step(self, tokens: list[int], held: bool | None, last: bool) -> None:
        """The next token's text (`tokens`: the reply's so far, that one among them)."""
        i, decode = len(self.texts), self.pieces._decode
        after = decode(tokens[self.start : i + 1])
        pending = held if held is not None else after.endswith("\ufffd")
        if pending and not last and (held is not None or i + 1 - self.read < PENDING):
            self.texts.append("")
            return
        self.texts.append(_past(decode(tokens[self.start : self.read]), after))
        self.start, self.read = self.read, i + 1


def _bytes(own: bytes | None, text: str) -> list[int]:
    """A token's bytes: its own where the tokenizer has them, else its text's."""
    return list(own if own is not None else text.encode("utf-8"))


def _utf8(run: bytes) -> bool:
    try:
        run.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _past(before: str, after: str) -> str:
    """What `after` adds to `before`; where a token changes how the text before it reads (a
    tokenizer's clean-up of spaces), what differs from there on."""
    if after.startswith(before):
        return after[len(before) :]
    pairs = enumerate(zip(before, after, strict=False))
    return after[next((k for k, (a, b) in pairs if a != b), len(after)) :]


def _holds(decoder: dict[str, Any], kind: str) -> bool:
    """Whether a decoder (as the tokenizers library describes it) is or holds one of `kind`."""
    if decoder.get("type") == kind:
        return True
    return any(_holds(inner, kind) for inner in decoder.get("decoders") or [])


@lru_cache(maxsize=8)
def _pieces(tokenizer: PreTrainedTokenizerBase) -> _Pieces:
    return _Pieces(tokenizer)
