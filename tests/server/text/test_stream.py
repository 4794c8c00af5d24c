"""server/text/stream.py: streamed deltas add up to the decoded text; stop strings never leak."""

from __future__ import annotations

import random

import pytest

from server.text.stream import IncrementalDecoder, TextStream
from training.tokenizer import train_tokenizer

CORPUS = ["héllo wörld, the cat sat on the mat", "日本語 text with ünïcode — and emoji 🙂",
          "AA B K D EH F G HH", "stop here STOP there"] * 20


@pytest.fixture(scope="module")
def tokenizers():
    return {kind: train_tokenizer(kind, CORPUS, vocab_size=300 if kind == "bpe" else None)
            for kind in ("char", "word", "bpe")}


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_deltas_concatenate_to_the_decoded_text(tokenizers, kind):
    tokenizer = tokenizers[kind]
    for text in CORPUS[:4]:
        ids = tokenizer.encode(text).ids
        decoder = IncrementalDecoder(tokenizer)
        deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert "".join(deltas) == tokenizer.decode(ids)
        assert all("\ufffd" not in d for d in deltas)  # a split character is held until complete


def test_context_gives_a_continuation_its_leading_space(tokenizers):
    tokenizer = tokenizers["word"]
    ids = tokenizer.encode("AA B K").ids
    decoder = IncrementalDecoder(tokenizer, context_ids=ids[:1])
    assert "".join(decoder.push(i) for i in ids[1:]) == " B K"


def stream_text(tokenizer, text, stop):
    """Push `text`'s tokens one by one; return (released deltas, final text, stopped)."""
    stream = TextStream(tokenizer, stop)
    deltas = []
    for token in tokenizer.encode(text).ids:
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    else:
        deltas.append(stream.finish())
    return deltas, stream.text, stream.stopped


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_stop_strings_never_leak_and_cut_the_text(tokenizers, kind):
    tokenizer = tokenizers[kind]
    text = "héllo wörld, the cat sat on the mat"
    rng = random.Random(0)
    for _ in range(60):
        start = rng.randrange(len(text) - 1)
        stop = text[start : start + rng.randint(1, 8)]
        decoy = stop[:-1] + "\x00" if len(stop) > 1 else "\x01"  # shares a prefix, never completes
        deltas, final, stopped = stream_text(tokenizer, text, (decoy, stop))
        assert stopped
        assert final == text[: text.index(stop)] == "".join(deltas)
        released = ""
        for delta in deltas:
            released += delta
            assert stop not in released and final.startswith(released)


def test_a_held_back_prefix_is_released_when_it_does_not_complete(tokenizers):
    tokenizer = tokenizers["char"]
    stream = TextStream(tokenizer, ("cats",))
    ids = tokenizer.encode("the cat sat").ids
    deltas = [stream.push(i) for i in ids[:7]]  # "the cat": "cat" may begin "cats"
    assert "".join(deltas) == "the "
    deltas.append(stream.push(ids[7]))  # " " settles it
    assert "".join(deltas) == "the cat "
    deltas += [stream.push(i) for i in ids[8:]] + [stream.finish()]
    assert "".join(deltas) == stream.text == "the cat sat" and not stream.stopped


def test_a_partial_stop_string_at_the_end_is_plain_text(tokenizers):
    tokenizer = tokenizers["char"]
    deltas, final, stopped = stream_text(tokenizer, "the ca", ("cat",))
    assert not stopped and final == "the ca" == "".join(deltas)


def test_earliest_stop_string_wins_and_a_stop_at_the_start_gives_empty_text(tokenizers):
    tokenizer = tokenizers["char"]
    assert stream_text(tokenizer, "the cat sat", ("sat", "cat"))[1] == "the "
    assert stream_text(tokenizer, "the cat sat", ("the",))[1:] == ("", True)
