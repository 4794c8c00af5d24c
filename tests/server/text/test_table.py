"""server/text/table.py: the table decodes exactly as the tokenizer does, one token at a time."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from server.text.stream import TextStream
from server.text.table import TableDecoder, TokenTable
from training.tokenizer import train_tokenizer

CORPUS = ["héllo wörld, the cat sat on the mat", "日本語 text with ünïcode — and emoji 🙂🙃",
          "AA B K D EH F G HH", "stop here STOP there\nnew line\ttab"] * 20
KINDS = ("char", "word", "bpe")


@pytest.fixture(scope="module")
def tokenizers():
    return {kind: train_tokenizer(kind, CORPUS, vocab_size=300 if kind == "bpe" else None) for kind in KINDS}


def random_sequences(tokenizer: Tokenizer, count: int, seed: int, model_vocab: int | None = None):
    """Random ids over the whole vocabulary (special tokens, ids past the tokenizer's, split characters)."""
    rng = random.Random(seed)
    size = model_vocab or tokenizer.get_vocab_size()
    return [[rng.randrange(size) for _ in range(rng.randint(0, 40))] for _ in range(count)]


@pytest.mark.parametrize("kind", KINDS)
def test_table_decode_equals_tokenizer_decode(tokenizers, kind):
    tokenizer = tokenizers[kind]
    table = TokenTable.build(tokenizer, vocab_size=tokenizer.get_vocab_size() + 50)
    assert table is not None
    assert table.separator == (" " if kind == "word" else "")
    for ids in random_sequences(tokenizer, 2000, seed=1, model_vocab=table.vocab_size):
        assert table.decode(ids) == tokenizer.decode(ids), ids


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_deltas_add_up_to_decode(tokenizers, kind):
    """Per token through TableDecoder (the TextStream path), and in chunks of any size through `push_many`
    (a plain row's tokens as a consumer takes them), flushed at the end: both equal `decode`, also after a
    context (a prompt, after which a word tokenizer's text starts with its separator)."""
    tokenizer = tokenizers[kind]
    table = TokenTable.build(tokenizer)
    rng = random.Random(3)
    for ids in random_sequences(tokenizer, 1000, seed=2):
        decoder = TableDecoder(table)
        deltas = [decoder.push(token) for token in ids] + [decoder.flush()]
        expected = tokenizer.decode(ids)
        assert "".join(deltas) == expected, ids
        context = random_sequences(tokenizer, 1, seed=rng.randrange(10**6))[0][:3]
        chunked, text, start = TableDecoder(table, context), "", 0
        while start < len(ids):
            end = start + rng.randint(1, 6)
            text += chunked.push_many(ids[start:end])
            start = end
        text += chunked.flush()
        spoken_before = table.separator and table.speaks(context) and table.speaks(ids)
        assert text == (table.separator if spoken_before else "") + expected, (context, ids)


@pytest.mark.parametrize("kind", KINDS)
def test_a_continuation_decodes_as_the_rest_of_the_whole(tokenizers, kind):
    tokenizer = tokenizers[kind]
    table = TokenTable.build(tokenizer)
    for text in CORPUS[:4]:
        ids = tokenizer.encode(text).ids
        for cut in range(1, len(ids)):
            context, rest = ids[:cut], ids[cut:]
            whole, before = tokenizer.decode(ids), tokenizer.decode(context)
            decoder = TableDecoder(table, context_ids=context)
            streamed = "".join(decoder.push(t) for t in rest) + decoder.flush()
            if whole.startswith(before):  # the context ends on a whole character
                assert streamed == whole[len(before):]
                assert table.decode(rest, after_text=table.speaks(context)) == streamed


@pytest.mark.parametrize("kind", ["bpe"])
def test_a_split_character_is_held_back_until_complete(tokenizers, kind):
    tokenizer = tokenizers[kind]
    table = TokenTable.build(tokenizer)
    ids = tokenizer.encode("🙂🙃 日本語").ids
    assert any(not table.whole[t] for t in ids)  # the emoji are split over tokens at this vocabulary size
    decoder = TableDecoder(table)
    deltas = [decoder.push(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas) and "".join(deltas) == "🙂🙃 日本語"
    assert table.decode(ids[:1], final=False) == ""  # an open character is not text yet


@pytest.mark.parametrize("kind", KINDS)
def test_text_stream_by_table_equals_the_decode_windows(tokenizers, kind):
    """Stop strings and held-back text behave the same whichever decoder the stream uses."""
    tokenizer = tokenizers[kind]
    table = TokenTable.build(tokenizer)
    rng = random.Random(3)
    text = CORPUS[0] + " " + CORPUS[1]
    ids = tokenizer.encode(text).ids
    decoded = tokenizer.decode(ids)
    for _ in range(40):
        start = rng.randrange(len(decoded) - 1)
        stop = (decoded[start : start + rng.randint(1, 6)], "zz" + decoded[start : start + 2])
        streams = [TextStream(tokenizer, stop), TextStream(tokenizer, stop, table=table)]
        outputs = []
        for stream in streams:
            deltas = []
            for token in ids:
                deltas.append(stream.push(token))
                if stream.stopped:
                    break
            else:
                deltas.append(stream.finish())
            outputs.append(("".join(deltas), stream.text, stream.stopped))
        assert outputs[0] == outputs[1]


def test_other_decoders_get_no_table():
    tokenizer = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()
    assert TokenTable.build(tokenizer) is None
