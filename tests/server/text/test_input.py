"""server/text/input.py: the character cap before tokenizing, and long texts tokenized on a worker thread."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from server.errors import InvalidArgument
from server.text.input import INLINE_CHARS, encode_text, input_char_limit, longest_token_chars


@pytest.fixture(scope="module")
def words() -> Tokenizer:
    vocab = {"<unk>": 0, "the": 1, "cat": 2, "sat": 3, "a": 4}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


class CountingExecutor(ThreadPoolExecutor):
    def __init__(self):
        super().__init__(max_workers=1)
        self.calls = 0

    def submit(self, fn, /, *args, **kwargs):
        self.calls += 1
        return super().submit(fn, *args, **kwargs)


def encode(tokenizer, text, max_tokens) -> tuple[list[int], int]:
    async def go():
        executor = CountingExecutor()
        asyncio.get_running_loop().set_default_executor(executor)
        return await encode_text(tokenizer, text, "prompt", max_tokens), executor.calls

    return asyncio.run(go())


def test_the_cap_is_the_token_limit_times_the_longest_token(words):
    assert longest_token_chars(words) == 5 and input_char_limit(words, 100) == 500


def test_short_texts_are_tokenized_inline_and_long_ones_on_a_worker_thread(words):
    short = "the cat sat"
    assert encode(words, short, 10) == (words.encode(short).ids, 0)
    long = "the   " * 1000  # 6000 characters, 1000 tokens: over INLINE_CHARS, under the cap of 5000 x 5
    assert len(long) > INLINE_CHARS
    ids, calls = encode(words, long, 5000)
    assert ids == words.encode(long).ids and calls == 1
    assert encode(words, "", 10) == ([], 0)


def test_over_the_cap_is_refused_by_length_and_over_the_limit_by_tokens(words):
    with pytest.raises(InvalidArgument, match=r"^prompt must be at most 50 characters long \(this server takes "
                                              r"at most 10 tokens\), got 51 characters$") as caught:
        encode(words, "a" * 51, 10)
    assert caught.value.field == "prompt" and caught.value.value == 51
    with pytest.raises(InvalidArgument, match=r"^prompt must be at most 10 tokens long, got 11 tokens$"):
        encode(words, "a " * 11, 10)
