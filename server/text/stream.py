"""Incremental detokenisation with stop strings: text deltas for streaming, never a partial stop string.

Two problems meet here. A token's text can depend on its neighbours (byte-level BPE splits a UTF-8
character over tokens; a word tokenizer puts a space *between* tokens), so a delta is the difference
between decoding a short window of ids with and without the newest token (TGI's prefix/read offsets).
And a stop string can arrive spread over several tokens, so text that might be the start of one is
held back until the next token settles it; the text returned ends before the stop string. Where the
tokenizer has a `TokenTable` the deltas come from it (no decode calls); the windows are the fallback.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

from server.text.table import TableDecoder, TokenTable

# Ids decoded again with every new token: enough for a multi-byte character or a word boundary.
_CONTEXT_TOKENS = 4
_INCOMPLETE = "\ufffd"  # what the byte-level decoder yields for a character it has only part of


class IncrementalDecoder:
    """Turns one token at a time into text deltas whose concatenation is the decoded text."""

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = ()):
        # `context_ids` (the end of a prompt) only shape the first deltas: a continuation after a word
        # starts with the space that separates it from that word.
        self._tokenizer = tokenizer
        self._ids = list(context_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """The text `token_id` adds; "" while it is the incomplete start of a character."""
        self._ids.append(int(token_id))
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_INCOMPLETE):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # Keep the window short: only ids after the prefix offset are ever decoded again.
        if self._prefix_offset > 2 * _CONTEXT_TOKENS:
            drop = self._prefix_offset - _CONTEXT_TOKENS
            del self._ids[:drop]
            self._prefix_offset -= drop
            self._read_offset -= drop
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Text still pending (an incomplete character at the very end), decoded as it is."""
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class TextStream:
    """The text of one generated sequence: deltas safe to send now, and whether a stop string ended it.

    `text` is everything released so far; once `stopped`, it is the final text (the stop string and
    anything after it excluded) and further pushes are ignored.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), context_ids: Sequence[int] = (),
                 table: TokenTable | None = None):
        self._decoder = (TableDecoder(table, context_ids) if table is not None
                         else IncrementalDecoder(tokenizer, context_ids))
        self._stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._pending = ""  # decoded text that may be the start of a stop string
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that can be released now ("" if none)."""
        if self.stopped:
            return ""
        return self._release(self._pending + self._decoder.push(token_id))

    def finish(self) -> str:
        """The sequence ended without a stop string: release everything held back."""
        if self.stopped:
            return ""
        delta = self._release(self._pending + self._decoder.flush())
        delta += self._pending  # no more text can come, so a partial stop string is plain text
        self.text += self._pending
        self._pending = ""
        return delta

    def _release(self, unreleased: str) -> str:
        if not self._stop:
            self.text += unreleased
            self._pending = ""
            return unreleased
        # A match can start in the held-back text (it is a stop prefix) or in the new delta, never in
        # released text (that text was released because no suffix of it started a stop string).
        found = [index for index in (unreleased.find(s) for s in self._stop) if index >= 0]
        if found:
            delta = unreleased[: min(found)]
            self.text += delta
            self._pending = ""
            self.stopped = True
            return delta
        hold = _longest_stop_prefix_suffix(unreleased, self._stop, self._longest_stop)
        delta = unreleased[: len(unreleased) - hold]
        self.text += delta
        self._pending = unreleased[len(unreleased) - hold :]
        return delta


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...], longest: int) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    for length in range(min(len(text), longest - 1), 0, -1):
        suffix = text[-length:]
        if any(s.startswith(suffix) for s in stops):
            return length
    return 0

