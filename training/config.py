"""The one block of training defaults; config files (configs/*.toml) and --set hold overrides only."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import tomllib


@dataclass
class TrainConfig:
    # --- what to train -------------------------------------------------------------------------
    kind: str = "lm"  # lm | seq2seq (set by `seqserve train lm|seq2seq`)
    train: str = ""  # training file: text (lm) or tab-separated pairs (seq2seq)
    valid: str = ""  # validation file, same format; drives early stopping and LR decay
    test: str = ""  # test file for `seqserve eval --split test`
    task: str = "text"  # text | translation | g2p: which evaluation figures to report
    max_train_examples: int = 0  # use only the first N training examples/documents (0 = all)

    # --- tokenizers ----------------------------------------------------------------------------
    tokenizer: str = "char"  # lm: char | word | bpe
    source_tokenizer: str = "char"  # seq2seq source side
    target_tokenizer: str = "word"  # seq2seq target side (word = whitespace symbols, e.g. phonemes)
    vocab_size: int = 8000  # for bpe tokenizers
    max_source_length: int = 100  # seq2seq pairs longer than this (in tokens) are skipped in training
    max_target_length: int = 100

    # --- model ---------------------------------------------------------------------------------
    cell: str = "lstm"  # lstm | gru | rnn
    embedding_size: int = 256
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.2
    tie_weights: bool = False  # lm: share input embedding and output layer
    attention: str = "general"  # seq2seq: dot | general | bahdanau
    input_feeding: bool = True  # seq2seq: feed the attentional vector to the next step
    bidirectional: bool = True  # seq2seq encoder

    # --- optimisation --------------------------------------------------------------------------
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0
    clip_norm: float = 5.0  # gradient-norm clipping (0 = off)
    schedule: str = "plateau"  # none | plateau (reduce on valid plateau) | step (decay every step_epochs)
    lr_decay: float = 0.5  # multiplier applied by plateau/step schedules
    lr_patience: int = 0  # plateau: epochs without improvement before decaying
    step_epochs: int = 1  # step: decay every this many epochs
    start_decay_epoch: int = 1  # step: first epoch after which decay applies
    min_lr: float = 1e-5
    warmup_steps: int = 0  # linear warmup from 0 over this many updates
    label_smoothing: float = 0.0
    scheduled_sampling: float = 0.0  # seq2seq: probability of feeding the model's own prediction

    # --- loop ----------------------------------------------------------------------------------
    epochs: int = 10
    batch_size: int = 64  # lm: parallel streams; seq2seq: pairs per batch
    bptt: int = 128  # lm: truncated-BPTT window in tokens
    seed: int = 1
    early_stopping: int = 5  # stop after this many epochs without valid improvement (0 = off)
    max_steps: int = 0  # stop after this many updates in total (0 = no limit); resume continues
    time_limit_minutes: float = 0.0  # do not start an epoch that would end past this budget (0 = none)
    checkpoint_every: int = 0  # also checkpoint every N updates (0 = only at epoch ends)
    keep_last: int = 2  # step/epoch checkpoints kept besides best.pt
    log_every: int = 50  # updates between log lines / TensorBoard points
    eval_decode: int = 0  # seq2seq: greedy-decode this many valid sources per epoch for WER/BLEU
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = False  # bf16 autocast on GPU
    overfit_batch: bool = False  # train on one batch only: loss must go to ~0 (debugging)
    progress: bool = True  # tqdm progress bar (rank 0 only under torchrun)
    dist_timeout_seconds: float = 600.0  # torchrun: how long a rank waits at a collective (rank 0's
    #   validation included) before the run stops with an error naming the failure; a dead rank is noticed
    #   at once, a hung one after this long

    def __post_init__(self):
        allowed = {"kind": ("lm", "seq2seq"), "cell": ("lstm", "gru", "rnn"), "optimizer": ("adam", "sgd"),
                   "schedule": ("none", "plateau", "step"), "attention": ("dot", "general", "bahdanau"),
                   "task": ("text", "translation", "g2p"), "device": ("auto", "cpu", "cuda")}
        for name, values in allowed.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name} must be one of {values}, got {getattr(self, name)!r}")
        for name in ("tokenizer", "source_tokenizer", "target_tokenizer"):
            if getattr(self, name) not in ("char", "word", "bpe"):
                raise ValueError(f"{name} must be one of char, word, bpe, got {getattr(self, name)!r}")
        if not self.dist_timeout_seconds > 0:
            raise ValueError(f"dist_timeout_seconds must be > 0, got {self.dist_timeout_seconds!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path, **facts) -> None:
        """The resolved config, plus facts about the run that are not settings (`world_size`)."""
        Path(path).write_text(json.dumps({**self.to_dict(), **facts}, indent=2, sort_keys=True) + "\n")


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value):
    if name not in _FIELDS:
        raise ValueError(f"unknown config key {name!r}; known keys: {', '.join(sorted(_FIELDS))}")
    default = _FIELDS[name].default
    if isinstance(value, str) and not isinstance(default, str):
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{name} must be true or false, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        return type(default)(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def load_config(kind: str, path: str | Path | None = None, overrides: list[str] = (),
                base_dir: Path | None = None) -> TrainConfig:
    """Defaults <- TOML file (sections are flattened) <- `key=value` overrides."""
    values: dict = {"kind": kind}
    if path:
        data = tomllib.loads(Path(path).read_text())
        for key, value in data.items():
            if isinstance(value, dict):
                values.update(value)
            else:
                values[key] = value
    values = {k: _coerce(k, v) for k, v in values.items()}
    values.update(parse_overrides(overrides))
    return TrainConfig(**values)


def parse_overrides(items: list[str]) -> dict:
    """`key=value` strings (from --set) -> typed values, checked against the config's fields."""
    values = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set takes key=value, got {item!r}")
        key, value = item.split("=", 1)
        values[key.strip()] = _coerce(key.strip(), value.strip())
    return values


def config_from_dict(data: dict) -> TrainConfig:
    known = {k: v for k, v in data.items() if k in _FIELDS}
    return TrainConfig(**known)


__all__ = ["TrainConfig", "load_config", "parse_overrides", "config_from_dict"]
