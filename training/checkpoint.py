"""Checkpoints that rebuild a model without the training script: state_dict + model args + tokenizers + config.

Beside the weights they carry optimizer, schedule, RNG and loop position, so `--resume` continues
exactly where the run stopped.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer

from training.config import TrainConfig, config_from_dict
from training.models import build_model

FORMAT = "seqserve-checkpoint-1"


def save_checkpoint(path: Path, *, model, cfg: TrainConfig, tokenizers: dict[str, Tokenizer],
                    optimizer=None, schedule=None, progress: dict | None = None, extra: dict | None = None
                    ) -> None:
    payload = {
        "format": FORMAT,
        "kind": model.kind,
        "model_args": model.model_args(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": cfg.to_dict(),
        "tokenizers": {role: tok.to_str() for role, tok in tokenizers.items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "schedule": schedule.state_dict() if schedule is not None else None,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": random.getstate(),
        },
        "progress": progress or {},
        "extra": extra or {},
    }
    tmp = Path(path).with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint behind


def load_checkpoint(path: Path) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a seqserve checkpoint (format {payload.get('format')!r})")
    return payload


def restore_rng(payload: dict) -> None:
    rng = payload["rng"]
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(rng["python"])


def model_from_checkpoint(payload: dict):
    model = build_model(payload["kind"], payload["model_args"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model


def tokenizers_from_checkpoint(payload: dict) -> dict[str, Tokenizer]:
    tokenizers = {role: Tokenizer.from_str(text) for role, text in payload["tokenizers"].items()}
    for tok in tokenizers.values():
        tok.encode_special_tokens = True  # as training_tokenizer set it; the flag is not serialised
    return tokenizers


def config_from_checkpoint(payload: dict) -> TrainConfig:
    return config_from_dict(payload["config"])


def find_checkpoint(run_or_file: str | Path, prefer: str = "best") -> Path:
    """A run directory resolves to best.pt (or last.pt); a file is taken as is."""
    path = Path(run_or_file)
    if path.is_file():
        return path
    order = ["best.pt", "last.pt"] if prefer == "best" else ["last.pt", "best.pt"]
    for name in order:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"no checkpoint in {path} (looked for {', '.join(order)})")


def prune_checkpoints(run: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` step-*.pt files; best.pt and last.pt are never pruned."""
    steps = sorted(run.glob("step-*.pt"), key=lambda p: int(re.findall(r"\d+", p.stem)[0]))
    for old in steps[: max(0, len(steps) - keep_last)]:
        old.unlink()
