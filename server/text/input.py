"""Request text to token ids, without letting one request stall the server.

A text is measured before it is tokenized: a token rarely covers more characters than the longest entry of
its vocabulary, so a text longer than `max_input_tokens` times that many characters is refused at once
(tokenizing 4 MB would hold the event loop for seconds). The cap is a documented limit rather than a
proof: a text that would tokenize short (runs of spaces a pre-tokenizer drops, one long unknown word
that becomes a single <unk>) is refused by it all the same. What passes the cap is tokenized on a worker
thread when it is long enough to matter; `encode_batch` releases the GIL while it runs, so the event loop
goes on serving everyone else meanwhile.
"""

from __future__ import annotations

import asyncio
import functools

from tokenizers import Tokenizer

from server.errors import InvalidArgument

# Texts up to this many characters are tokenized inline: a thread hop costs more than they do.
INLINE_CHARS = 4096


@functools.lru_cache(maxsize=64)
def longest_token_chars(tokenizer: Tokenizer) -> int:
    """Characters in the longest entry of the tokenizer's vocabulary, added tokens included (at least 1)."""
    return max((len(token) for token in tokenizer.get_vocab(with_added_tokens=True)), default=1) or 1


def input_char_limit(tokenizer: Tokenizer, max_tokens: int) -> int:
    """The most characters a text may have before it is tokenized: `max_tokens` of the longest token."""
    return max_tokens * longest_token_chars(tokenizer)


def check_input_chars(tokenizer: Tokenizer, text: str, field: str, max_tokens: int) -> None:
    """InvalidArgument naming `field` when `text` is too long to be tokenized at all (see module doc)."""
    limit = input_char_limit(tokenizer, max_tokens)
    if len(text) > limit:
        raise InvalidArgument(
            f"{field} must be at most {limit} characters long (this server takes at most {max_tokens} tokens), "
            f"got {len(text)} characters", field=field, value=len(text),
            allowed=f"at most {limit} characters and {max_tokens} tokens")


async def encode_text(tokenizer: Tokenizer, text: str, field: str, max_tokens: int) -> list[int]:
    """Token ids of `text` (no special tokens added by the server), at most `max_tokens` of them.

    InvalidArgument naming `field` when the text is over the character cap (checked first, in O(1)) or
    its tokens are over `max_tokens`.
    """
    if not text:
        return []
    check_input_chars(tokenizer, text, field, max_tokens)
    if len(text) <= INLINE_CHARS:
        ids = tokenizer.encode(text).ids
    else:
        (encoding,) = await asyncio.get_running_loop().run_in_executor(None, tokenizer.encode_batch, [text])
        ids = encoding.ids
    if len(ids) > max_tokens:
        raise InvalidArgument(f"{field} must be at most {max_tokens} tokens long, got {len(ids)} tokens",
                              field=field, value=len(ids), allowed=f"at most {max_tokens} tokens")
    return list(ids)
