"""Detokenisation by table: every token's bytes are worked out once per tokenizer, so the text of a step
is an array lookup for most rows instead of `decode` calls per row.

The table reproduces `tokenizers`' `decode` (special tokens skipped) for the decoders seqserve's
tokenizers use: byte-level BPE (`decoders.ByteLevel`: each character of a token stands for one byte;
the text is the bytes decoded as UTF-8, an invalid sequence replaced by U+FFFD), char (`decoders.Fuse`:
the tokens' strings concatenated) and word (no decoder: the tokens joined by one space). `build`
returns None for any other decoder, or if a check against `decode` finds a difference; the engine
then decodes windows of ids as before (`server.text.stream.IncrementalDecoder`).
"""

from __future__ import annotations

import codecs
import random
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer, decoders

# Token sequences `build` decodes both ways before it trusts the table.
_CHECK_SEQUENCES = 64
_CHECK_LENGTH = 24


def _byte_of_character() -> dict[str, int]:
    """Byte-level BPE's alphabet: the character that stands for each byte (printable bytes stand for
    themselves, the others for the code points from 256 up, in byte order), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in characters)
    for offset, byte in enumerate(shifted):
        characters[byte] = chr(256 + offset)
    return {character: byte for byte, character in characters.items()}


class TokenTable:
    """Per token id: its bytes, its text when it starts at a character boundary, whether it decodes to
    nothing (special tokens, ids the tokenizer does not know)."""

    def __init__(self, pieces: list[bytes], silent: np.ndarray, separator: str):
        self.pieces = pieces
        self.separator = separator  # put between two tokens' texts: " " for word tokenizers
        self.silent = silent  # [V] bool
        texts = np.empty(len(pieces), dtype=object)
        whole = np.zeros(len(pieces), dtype=bool)
        for token, piece in enumerate(pieces):  # once per tokenizer
            try:
                texts[token] = piece.decode("utf-8")
                whole[token] = True
            except UnicodeDecodeError:  # part of a character: decoded with its neighbours
                texts[token] = ""
        self.whole = whole  # [V] bool: the token's bytes are whole characters
        self.texts = texts  # [V] str: a whole token's text with nothing before it
        spaced = np.array([separator + t if t and not s else t for t, s in zip(texts, silent, strict=True)],
                          dtype=object)
        self.spaced = spaced  # [V] str: its text after an earlier token's (the separator first)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @classmethod
    def build(cls, tokenizer: Tokenizer, vocab_size: int | None = None) -> TokenTable | None:
        """The table of `tokenizer` for ids below `vocab_size` (the model's; default the tokenizer's), or
        None when its decoder is not one the table reproduces."""
        decoder = tokenizer.decoder
        size = max(tokenizer.get_vocab_size(with_added_tokens=True), vocab_size or 0)
        special = {token_id for token_id, added in tokenizer.get_added_tokens_decoder().items() if added.special}
        strings = [tokenizer.id_to_token(token_id) for token_id in range(size)]
        silent = np.array([s is None or i in special for i, s in enumerate(strings)], dtype=bool)
        if isinstance(decoder, decoders.ByteLevel):
            byte_of = _byte_of_character()
            if not all(c in byte_of for s, quiet in zip(strings, silent, strict=True) if not quiet for c in s):
                return None
            pieces = [b"" if quiet else bytes(byte_of[c] for c in s) for s, quiet in zip(strings, silent, strict=True)]
            separator = ""
        elif isinstance(decoder, decoders.Fuse) or decoder is None:
            pieces = [b"" if quiet else s.encode("utf-8") for s, quiet in zip(strings, silent, strict=True)]
            separator = "" if decoder is not None else " "
        else:
            return None
        table = cls(pieces, silent, separator)
        return table if table._agrees_with(tokenizer) else None

    def decode(self, token_ids: Sequence[int], after_text: bool = False, final: bool = True) -> str:
        """The text of `token_ids` as `tokenizer.decode` gives it; `after_text`: text came before them (a
        word tokenizer then starts with its separator); not `final`: an incomplete character at the end
        is left out (it may still be completed)."""
        pieces, silent = self.pieces, self.silent
        spoken = [token for token in token_ids if not silent[token]]
        if self.separator:
            text = self.separator.join(self.texts[token] for token in spoken)
            return self.separator + text if after_text and text else text
        data = b"".join([pieces[token] for token in spoken])
        return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=final)

    def speaks(self, token_ids: Sequence[int]) -> bool:
        """Whether any of `token_ids` has text (after such a context a word tokenizer's text starts with
        its separator)."""
        return any(not self.silent[token] for token in token_ids)

    def _agrees_with(self, tokenizer: Tokenizer) -> bool:
        """Every single token, and random sequences of them, decode as the tokenizer decodes them."""
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        singles = [[token] for token in range(size)]
        if tokenizer.decode_batch(singles) != [self.decode(ids) for ids in singles]:
            return False
        rng = random.Random(0)
        sequences = [[rng.randrange(size) for _ in range(rng.randint(1, _CHECK_LENGTH))]
                     for _ in range(_CHECK_SEQUENCES)]
        return tokenizer.decode_batch(sequences) == [self.decode(ids) for ids in sequences]


class Utf8Tail:
    """The incomplete character at the end of a row's bytes (byte-level BPE splits characters over
    tokens): bytes in, whole characters out."""

    def __init__(self, table: TokenTable):
        self._pieces = table.pieces
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self._pieces[token_id])

    @property
    def pending(self) -> bool:
        return bool(self._decoder.getstate()[0])

    def flush(self) -> str:
        """What is left, decoded as it is (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class TableDecoder:
    """`IncrementalDecoder`'s interface by table: one token at a time to text deltas."""

    def __init__(self, table: TokenTable, context_ids: Sequence[int] = ()):
        self._table = table
        self._spoken = bool(table.separator) and table.speaks(context_ids)
        self._tail: Utf8Tail | None = None

    @property
    def pending(self) -> bool:
        return self._tail is not None and self._tail.pending

    def push(self, token_id: int) -> str:
        table = self._table
        if table.silent[token_id]:
            return ""
        if table.whole[token_id] and not self.pending:
            text = table.spaced[token_id] if self._spoken else table.texts[token_id]
            self._spoken = True
            return text
        if self._tail is None:
            self._tail = Utf8Tail(table)
        return self._tail.push(token_id)

    def push_many(self, token_ids: Sequence[int]) -> str:
        """The text of several tokens at once: `push` of each, joined; by lookup over them all when they are
        whole characters and no character is open (the usual case)."""
        table = self._table
        if len(token_ids) == 1 or self.pending:
            return "".join([self.push(token) for token in token_ids])
        ids = np.asarray(token_ids, dtype=np.int64)
        if not table.whole[ids].all():
            return "".join([self.push(token) for token in token_ids])
        if not table.separator:
            return "".join(table.texts[ids].tolist())
        pieces = table.spaced[ids]
        if not self._spoken:
            spoken = np.flatnonzero(~table.silent[ids])
            if not spoken.size:
                return ""
            pieces[spoken[0]] = table.texts[ids[spoken[0]]]
            self._spoken = True
        return "".join(pieces.tolist())

    def flush(self) -> str:
        return self._tail.flush() if self._tail is not None else ""
