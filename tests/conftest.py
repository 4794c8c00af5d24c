"""Shared fixtures: tiny trained runs (every cell x kind) on generated data, trained once per session."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import pytest

from bench.services import RedisServer

CELLS = ("lstm", "gru", "rnn")
KINDS = ("lm", "seq2seq")

_WORDS = "the a cat dog sat ran on under mat log big small red blue".split()
_LETTERS = "abcdefgh"
_PHONES = {c: p for c, p in zip(_LETTERS, "AA B K D EH F G HH".split(), strict=True)}


def _write_lm_corpus(directory: Path, rng: random.Random) -> dict[str, str]:
    """One short sentence per line (a file without `%` lines is read one document per line)."""
    paths = {}
    for split, count in (("train", 240), ("valid", 40), ("test", 40)):
        lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 7))) for _ in range(count)]
        path = directory / f"lm.{split}.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths[split] = str(path)
    return paths


def _write_pair_corpus(directory: Path, rng: random.Random) -> dict[str, str]:
    """A toy grapheme-to-phoneme task: letters map to symbols, so a tiny model learns some of it."""
    paths = {}
    for split, count in (("train", 300), ("valid", 40), ("test", 40)):
        lines = []
        for _ in range(count):
            word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(1, 6)))
            lines.append(f"{word}\t{' '.join(_PHONES[c] for c in word)}")
        path = directory / f"pairs.{split}.tsv"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths[split] = str(path)
    return paths


def tiny_config(kind: str, cell: str, corpus: dict[str, str]):
    from training.config import TrainConfig

    common = dict(kind=kind, cell=cell, train=corpus["train"], valid=corpus["valid"], test=corpus["test"],
                  embedding_size=8, hidden_size=12, num_layers=2, dropout=0.1, lr=1e-2,
                  early_stopping=0, device="cpu", progress=False, seed=7)
    # Enough epochs that greedy outputs are real words/phonemes, not one token repeated, so the
    # parity checks compare something (a few seconds per run).
    if kind == "lm":
        return TrainConfig(**common, epochs=3, tokenizer="char", batch_size=8, bptt=32)
    return TrainConfig(**common, epochs=10, task="g2p", source_tokenizer="char", target_tokenizer="word",
                       batch_size=16)


class TinyRuns:
    """`runs[cell, kind]` -> a run directory (best.pt, last.pt, config.json), trained on first use."""

    def __init__(self, root: Path):
        self.root = root
        rng = random.Random(1234)
        data = root / "data"
        data.mkdir()
        self.corpora = {"lm": _write_lm_corpus(data, rng), "seq2seq": _write_pair_corpus(data, rng)}
        self._runs: dict[tuple[str, str], Path] = {}

    def __getitem__(self, key: tuple[str, str]) -> Path:
        if key not in self._runs:
            from training.loop import train

            cell, kind = key
            out = self.root / f"{kind}-{cell}"
            with torch_threads(1):
                train(tiny_config(kind, cell, self.corpora[kind]), out)
            self._runs[key] = out
        return self._runs[key]


@contextlib.contextmanager
def torch_threads(count: int):
    """Tiny models on a shared 2-core machine run several times faster on one thread than on two
    threads that spin against other processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> TinyRuns:
    return TinyRuns(tmp_path_factory.mktemp("tiny-runs"))


@pytest.fixture
def one_torch_thread():
    """Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")` in modules of tiny models."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One redis-server for the test session; tests that need a clean one call `.flush()`."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()
