"""The training loop: every cell x kind learns, one batch overfits, and --resume continues exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from training.config import TrainConfig, load_config
from training.loop import train

LETTERS = "abcdef"
PHONES = dict(zip(LETTERS, "AA1 B K D EH0 F".split(), strict=True))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(5)
    words = sorted({"".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 5))) for _ in range(400)})
    rng.shuffle(words)
    pairs = {"train": words[:200], "valid": words[200:240]}
    paths = {}
    for split, items in pairs.items():
        path = root / f"{split}.tsv"
        path.write_text("".join(f"{w}\t{' '.join(PHONES[c] for c in w)}\n" for w in items))
        paths[f"pairs_{split}"] = str(path)
    sentences = ["the cat sat on the mat", "a dog ran to the log", "big red cat", "small blue dog sat"]
    for split, n in (("train", 120), ("valid", 20)):
        path = root / f"{split}.txt"
        path.write_text("\n".join(rng.choice(sentences) for _ in range(n)) + "\n")
        paths[f"text_{split}"] = str(path)
    return paths


def config(kind: str, cell: str, corpus: dict, **overrides) -> TrainConfig:
    src = "pairs" if kind == "seq2seq" else "text"
    values = dict(kind=kind, cell=cell, train=corpus[f"{src}_train"], valid=corpus[f"{src}_valid"],
                  embedding_size=12, hidden_size=16, num_layers=2, dropout=0.1, lr=1e-2, epochs=3,
                  batch_size=16 if kind == "seq2seq" else 4, bptt=24, early_stopping=0, device="cpu",
                  progress=False, seed=3, task="g2p" if kind == "seq2seq" else "text",
                  source_tokenizer="char", target_tokenizer="word", tokenizer="char")
    values.update(overrides)
    return TrainConfig(**values)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_every_cell_and_kind_learns(kind, cell, corpus, tmp_path):
    summary = train(config(kind, cell, corpus), tmp_path)
    history = losses(tmp_path)
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last < 0.7 * first, f"loss went from {first:.3f} to {last:.3f}"
    assert summary["valid_loss"] < first
    assert {"best.pt", "last.pt", "config.json"} <= {p.name for p in tmp_path.iterdir()}
    assert any((tmp_path / "tensorboard").iterdir()), "no TensorBoard events written"


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_overfit_one_batch_goes_to_zero(kind, corpus, tmp_path):
    cfg = config(kind, "lstm", corpus, overfit_batch=True, epochs=300, dropout=0.0, lr=1e-2,
                 hidden_size=64, schedule="none")
    train(cfg, tmp_path)
    assert losses(tmp_path)[-1] < 0.05


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_resume_continues_exactly(kind, corpus, tmp_path):
    full = tmp_path / "full"
    train(config(kind, "lstm", corpus, epochs=2), full)
    cut = tmp_path / "cut"
    steps_per_epoch = len([r for r in losses(full)]) // 2
    # Interrupt mid-epoch, then resume: the loss curve must be the uninterrupted one, bit for bit.
    train(config(kind, "lstm", corpus, epochs=2, max_steps=steps_per_epoch + 2), cut)
    train(None, cut, resume=True, overrides={"max_steps": 0})
    assert losses(cut) == losses(full)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('cell = "gru"\n[optim]\nlr = 0.5\n')
    cfg = load_config("lm", path, ["hidden_size=64", "amp=true", "time_limit_minutes=1.5"])
    assert (cfg.cell, cfg.lr, cfg.hidden_size, cfg.amp, cfg.time_limit_minutes) == ("gru", 0.5, 64, True, 1.5)
    with pytest.raises(ValueError, match="unknown config key 'hiden_size'"):
        load_config("lm", None, ["hiden_size=3"])
    with pytest.raises(ValueError, match="cell must be one of"):
        load_config("lm", None, ["cell=transformer"])
