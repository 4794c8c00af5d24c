"""Tests for training/tokenizer.py: fixed special ids, exact round trips, unknowns, save/load."""

import pytest

from training.tokenizer import load_tokenizer, save_tokenizer, special_ids, train_tokenizer

TEXTS = [
    "Die Größe  der Welt.\n\nZweite Zeile\tmit Tab",
    "hello   world  \n",
    "A tall, dark stranger will have more fun than you.",
]
PHONEMES = ["HH AH0 L OW1", "W ER1 L D", "AH0 B AW1 T"]


def _roundtrip(tokenizer, text):
    return tokenizer.decode(tokenizer.encode(text).ids)


def test_special_ids_are_fixed():
    assert special_ids() == {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}


@pytest.mark.parametrize("kind,texts", [("char", TEXTS), ("word", PHONEMES), ("bpe", TEXTS * 5)])
def test_every_kind_has_the_special_tokens_at_their_ids_and_adds_none(kind, texts):
    tokenizer = train_tokenizer(kind, texts, vocab_size=300 if kind == "bpe" else None)
    for token, index in special_ids().items():
        assert tokenizer.token_to_id(token) == index
    ids = tokenizer.encode(texts[0]).ids
    assert not set(ids) & {0, 1, 2}


@pytest.mark.parametrize("text", TEXTS + ["Größe", " \n \n  ", "fun\n"])
def test_char_round_trip_is_exact_including_spaces_newlines_and_umlauts(text):
    tokenizer = train_tokenizer("char", TEXTS)
    assert _roundtrip(tokenizer, text) == text


def test_char_is_one_token_per_character():
    tokenizer = train_tokenizer("char", TEXTS)
    assert tokenizer.encode("Größe  \n").tokens == ["G", "r", "ö", "ß", "e", " ", " ", "\n"]


def test_char_unknown_character_is_unk_and_does_not_crash():
    tokenizer = train_tokenizer("char", TEXTS)
    ids = tokenizer.encode("a€b漢").ids
    assert ids[1] == 3 and ids[3] == 3 and len(ids) == 4
    assert _roundtrip(tokenizer, "a€b") == "ab"  # decode skips special tokens, <unk> included


def test_decode_skips_special_tokens():
    tokenizer = train_tokenizer("char", TEXTS)
    ids = tokenizer.encode("fun").ids
    assert tokenizer.decode([1] + ids + [2, 0, 0]) == "fun"


def test_literal_special_token_text_is_encoded_as_plain_text():
    tokenizer = train_tokenizer("char", ["<eos> and <pad>"])
    ids = tokenizer.encode("<eos>").ids
    assert len(ids) == 5 and not set(ids) & {0, 1, 2, 3}
    assert _roundtrip(tokenizer, "<eos>") == "<eos>"


def test_word_splits_on_whitespace_and_decodes_with_single_spaces():
    tokenizer = train_tokenizer("word", PHONEMES)
    encoding = tokenizer.encode("HH  AH0\tL OW1\n")
    assert encoding.tokens == ["HH", "AH0", "L", "OW1"]
    assert tokenizer.decode(encoding.ids) == "HH AH0 L OW1"
    assert tokenizer.encode("HH ZH").ids[1] == 3


def test_char_and_word_vocab_size_is_a_cap_that_keeps_the_frequent_symbols():
    tokenizer = train_tokenizer("word", ["A A A B B C"], vocab_size=6)
    assert tokenizer.get_vocab_size() == 6
    assert tokenizer.token_to_id("A") is not None and tokenizer.token_to_id("C") is None


@pytest.mark.parametrize("text", TEXTS + ["ünseen 漢字 \r\n x"])
def test_bpe_round_trip_is_exact_even_for_unseen_characters(text):
    tokenizer = train_tokenizer("bpe", TEXTS * 5, vocab_size=300)
    assert _roundtrip(tokenizer, text) == text
    assert 3 not in tokenizer.encode(text).ids


def test_bpe_merges_frequent_text():
    tokenizer = train_tokenizer("bpe", TEXTS * 5, vocab_size=300)
    assert len(tokenizer.encode(TEXTS[2]).ids) < len(TEXTS[2].encode())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer("sentencepiece", TEXTS)
    with pytest.raises(ValueError, match="at least 260"):
        train_tokenizer("bpe", TEXTS, vocab_size=100)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer("char", TEXTS, vocab_size=4)


def test_training_is_deterministic():
    assert train_tokenizer("char", TEXTS).to_str() == train_tokenizer("char", TEXTS).to_str()


@pytest.mark.parametrize("kind,texts", [("char", TEXTS), ("word", PHONEMES), ("bpe", TEXTS * 5)])
def test_save_and_load_give_the_same_tokenizer(tmp_path, kind, texts):
    tokenizer = train_tokenizer(kind, texts, vocab_size=300 if kind == "bpe" else None)
    path = tmp_path / "model" / "tokenizer.json"
    save_tokenizer(tokenizer, path)
    loaded = load_tokenizer(path)
    assert loaded.to_str() == tokenizer.to_str()
    for text in texts + ["<eos>"]:
        assert loaded.encode(text).ids == tokenizer.encode(text).ids
