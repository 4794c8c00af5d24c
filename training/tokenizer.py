"""The three tokenizer kinds seqserve trains (char, word, bpe), all HF `tokenizers`, saved as tokenizer.json.

Every kind has `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3 and no post-processor: `encode` adds no
special tokens (the model code adds `<bos>`/`<eos>` where it needs them) and `decode` drops them
(`skip_special_tokens` is the `tokenizers` default). No kind has a normalizer, so text is never
changed on its way in:

- `char`: one token per character (a Unicode code point), spaces, tabs and newlines included;
  `decode(encode(t).ids) == t` for any text over the training alphabet, and an unseen character
  becomes `<unk>`.
- `word`: whitespace-separated symbols (ARPAbet phonemes); decode joins them with one space.
- `bpe`: byte-level BPE, so every text round-trips exactly and nothing is ever unknown.

Literal special-token text in the input ("<eos>") is encoded as ordinary text, never as the special
id, so data cannot inject control tokens; that is the runtime flag `encode_special_tokens`, which
`tokenizer.json` does not store: load with `load_tokenizer` (or set the flag) to keep it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # in id order: the trainers give them ids 0..3

DEFAULT_BPE_VOCAB_SIZE = 8000
_BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()
# The smallest byte-level BPE vocabulary: the special tokens plus one token per byte.
MIN_BPE_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(_BYTE_ALPHABET)


def special_ids() -> dict[str, int]:
    """The fixed ids of the special tokens: {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}."""
    return {token: index for index, token in enumerate(SPECIAL_TOKENS)}


def _word_level_trainer(vocab_size: int | None, min_frequency: int) -> trainers.WordLevelTrainer:
    # An int cap is needed by the trainer; a huge one means "every symbol seen often enough".
    return trainers.WordLevelTrainer(
        vocab_size=vocab_size if vocab_size is not None else 2**31 - 1,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )


def _train_char(texts: Iterable[str], vocab_size: int | None, min_frequency: int) -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    # `[\s\S]` is "any character" in Oniguruma: `.` would leave runs of newlines as one piece.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # concatenate: the spaces are tokens of their own
    tokenizer.train_from_iterator(texts, _word_level_trainer(vocab_size, min_frequency))
    return tokenizer


def _train_word(texts: Iterable[str], vocab_size: int | None, min_frequency: int) -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: `tokenizers` then joins the tokens with single spaces, which is what we want.
    tokenizer.train_from_iterator(texts, _word_level_trainer(vocab_size, min_frequency))
    return tokenizer


def _train_bpe(texts: Iterable[str], vocab_size: int | None, min_frequency: int) -> Tokenizer:
    vocab_size = DEFAULT_BPE_VOCAB_SIZE if vocab_size is None else vocab_size
    if vocab_size < MIN_BPE_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size for a bpe tokenizer must be at least {MIN_BPE_VOCAB_SIZE} "
            f"(4 special tokens + 256 bytes), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    # Byte-level: every string maps to bytes, so spaces, newlines and unseen characters round-trip.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=_BYTE_ALPHABET,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


_TRAINERS: dict[str, Callable[[Iterable[str], int | None, int], Tokenizer]] = {
    "char": _train_char,
    "word": _train_word,
    "bpe": _train_bpe,
}
TOKENIZER_KINDS = tuple(_TRAINERS)


def _check_special_ids(tokenizer: Tokenizer) -> None:
    for token, expected in special_ids().items():
        actual = tokenizer.token_to_id(token)
        if actual != expected:
            raise ValueError(f"tokenizer has {token} at id {actual}, seqserve requires id {expected}")


def train_tokenizer(
    kind: str,
    texts: Iterable[str],
    vocab_size: int | None = None,
    min_frequency: int = 1,
) -> Tokenizer:
    """Train a `kind` tokenizer ("char", "word" or "bpe") on texts.

    vocab_size counts the special tokens. For char and word it is a cap (the most frequent symbols
    are kept; None keeps all); for bpe it is the target size (None: 8000, at least 260).
    min_frequency drops symbols (char, word) or merges (bpe) seen fewer times.
    """
    if kind not in _TRAINERS:
        raise ValueError(f"tokenizer kind must be one of {', '.join(TOKENIZER_KINDS)}, got {kind!r}")
    if vocab_size is not None and vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be more than {len(SPECIAL_TOKENS)} (the special tokens), got {vocab_size}"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
    tokenizer = _TRAINERS[kind](texts, vocab_size, min_frequency)
    _check_special_ids(tokenizer)
    tokenizer.encode_special_tokens = True
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    """Write tokenizer.json (creating parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer.json, check the special ids and encode special-token text as plain text."""
    tokenizer = Tokenizer.from_file(str(path))
    _check_special_ids(tokenizer)
    tokenizer.encode_special_tokens = True
    return tokenizer
