"""Reading a run's corpora and turning them into token ids with the run's tokenizers."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from training.config import TrainConfig
from training.data.files import read_documents, read_pairs
from training.tokenizer import train_tokenizer


@dataclass
class LMData:
    train: list[list[int]]
    valid: list[list[int]]


@dataclass
class PairData:
    train: list[tuple[list[int], list[int]]]
    valid: list[tuple[list[int], list[int]]]
    valid_text: list[tuple[str, str]]


def build_tokenizers(cfg: TrainConfig) -> dict[str, Tokenizer]:
    """Tokenizers are trained on the training split only, so valid/test unknowns stay unknown."""
    if cfg.kind == "lm":
        docs = _limit(read_documents(cfg.train), cfg.max_train_examples)
        return {"text": train_tokenizer(cfg.tokenizer, docs, vocab_size=cfg.vocab_size)}
    pairs = _limit(read_pairs(cfg.train), cfg.max_train_examples)
    return {
        "source": train_tokenizer(cfg.source_tokenizer, [s for s, _ in pairs], vocab_size=cfg.vocab_size),
        "target": train_tokenizer(cfg.target_tokenizer, [t for _, t in pairs], vocab_size=cfg.vocab_size),
    }


def load_lm_data(cfg: TrainConfig, tok: Tokenizer) -> LMData:
    def encode(path):
        return [e.ids for e in tok.encode_batch(read_documents(path))] if path else []
    train = [e.ids for e in tok.encode_batch(_limit(read_documents(cfg.train), cfg.max_train_examples))]
    return LMData(train=train, valid=encode(cfg.valid))


def encode_pairs(pairs: list[tuple[str, str]], src_tok: Tokenizer, tgt_tok: Tokenizer
                 ) -> list[tuple[list[int], list[int]]]:
    src = src_tok.encode_batch([s for s, _ in pairs])
    tgt = tgt_tok.encode_batch([t for _, t in pairs])
    return [(s.ids, t.ids) for s, t in zip(src, tgt, strict=True)]


def load_pair_data(cfg: TrainConfig, tokenizers: dict[str, Tokenizer]) -> PairData:
    src_tok, tgt_tok = tokenizers["source"], tokenizers["target"]
    train = encode_pairs(_limit(read_pairs(cfg.train), cfg.max_train_examples), src_tok, tgt_tok)
    train = [(s, t) for s, t in train
             if 0 < len(s) <= cfg.max_source_length and len(t) <= cfg.max_target_length]
    valid_text = read_pairs(cfg.valid) if cfg.valid else []
    return PairData(train=train, valid=encode_pairs(valid_text, src_tok, tgt_tok), valid_text=valid_text)


def _limit(items: list, n: int) -> list:
    return items[:n] if n else items
