"""The training loop shared by LMs and seq2seq models: seeded, resumable, logged, early-stopped."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from training.batching import (
    PAD,
    batchify,
    bptt_windows,
    bucketed_batches,
    epoch_generator,
    lm_stream,
    lm_targets_mask,
    make_pair_batch,
)
from training.checkpoint import (
    config_from_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
    tokenizers_from_checkpoint,
)
from training.config import TrainConfig
from training.models import build_model
from training.models.rnn import detach_state
from training.prepare import build_tokenizers, load_lm_data, load_pair_data
from training.schedule import LRSchedule


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch sees no GPU")
    return torch.device(name)


def model_args_for(cfg: TrainConfig, tokenizers) -> dict:
    if cfg.kind == "lm":
        return dict(vocab_size=tokenizers["text"].get_vocab_size(), cell=cfg.cell,
                    embedding_size=cfg.embedding_size, hidden_size=cfg.hidden_size,
                    num_layers=cfg.num_layers, dropout=cfg.dropout, tie_weights=cfg.tie_weights)
    return dict(source_vocab_size=tokenizers["source"].get_vocab_size(),
                target_vocab_size=tokenizers["target"].get_vocab_size(), cell=cfg.cell,
                embedding_size=cfg.embedding_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                bidirectional=cfg.bidirectional, attention=cfg.attention,
                input_feeding=cfg.input_feeding, dropout=cfg.dropout)


class Trainer:
    """One run directory: config.json, train_log.jsonl, tensorboard/, best.pt, last.pt, step-N.pt."""

    def __init__(self, cfg: TrainConfig, out: str | Path, resume: bool = False, overrides: dict | None = None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        payload = None
        if resume:
            last = self.out / "last.pt"
            if not last.is_file():
                raise FileNotFoundError(f"--resume: no last.pt in {self.out}")
            payload = load_checkpoint(last)
            cfg = config_from_checkpoint(payload)
            for key, value in (overrides or {}).items():
                setattr(cfg, key, value)
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.device = pick_device(cfg.device)
        self.tokenizers = tokenizers_from_checkpoint(payload) if payload else build_tokenizers(cfg)
        if cfg.kind == "lm":
            self.data = load_lm_data(cfg, self.tokenizers["text"])
        else:
            self.data = load_pair_data(cfg, self.tokenizers)
        self.model = build_model(cfg.kind, model_args_for(cfg, self.tokenizers)).to(self.device)
        params = self.model.parameters()
        if cfg.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                             weight_decay=cfg.weight_decay)
        self.schedule = LRSchedule(cfg, self.optimizer)
        self.progress = {"epoch": 1, "step_in_epoch": 0, "global_step": 0, "done": False}
        self.carry = None  # LM state carried between BPTT windows
        if payload:
            self.model.load_state_dict(payload["state_dict"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.schedule.load_state_dict(payload["schedule"])
            self.progress = dict(payload["progress"])
            carry = payload["extra"].get("carry")
            self.carry = tuple(c.to(self.device) for c in carry) if carry is not None else None
            restore_rng(payload)
        cfg.save(self.out / "config.json")
        self.log_file = open(self.out / "train_log.jsonl", "a")
        self.writer = _summary_writer(self.out / "tensorboard")

    # --- batches ----------------------------------------------------------------------------------
    def plan_epoch(self, epoch: int) -> list:
        cfg = self.cfg
        if cfg.kind == "lm":
            # Overfitting replays epoch 1's first window, so the batch really is the same every time.
            gen = epoch_generator(cfg.seed, 1 if cfg.overfit_batch else epoch)
            docs = list(self.data.train)
            order = torch.randperm(len(docs), generator=gen).tolist()  # a new document order each epoch
            self._lm_data = batchify(lm_stream([docs[i] for i in order]), cfg.batch_size)
            windows = bptt_windows(self._lm_data, cfg.bptt)
            return windows[:1] if cfg.overfit_batch else windows
        batches = bucketed_batches(self.data.train, cfg.batch_size, epoch_generator(cfg.seed, epoch),
                                   shuffle=not cfg.overfit_batch)
        return batches[:1] if cfg.overfit_batch else batches

    # --- one update ---------------------------------------------------------------------------------
    def loss_lm(self, window) -> tuple[torch.Tensor, int]:
        start, length = window
        data = self._lm_data
        x = data[:, start: start + length].to(self.device)
        y = data[:, start + 1: start + 1 + length].to(self.device)
        batch = x.shape[0]
        if self.carry is None or self.cfg.overfit_batch:
            self.carry = self.model.initial_state(batch, self.device)
        lengths = torch.full((batch,), length, dtype=torch.long)
        logits, state = self.model.logits(x, lengths, self.carry)
        self.carry = detach_state(state)
        mask = lm_targets_mask(y)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none",
                               label_smoothing=self.cfg.label_smoothing)
        n = int(mask.sum())
        return (loss * mask.reshape(-1)).sum() / max(n, 1), n

    def loss_seq2seq(self, indices) -> tuple[torch.Tensor, int]:
        batch = make_pair_batch([self.data.train[i] for i in indices]).to(self.device)
        logits = self.model(batch.src, batch.src_lengths, batch.tgt_in, sampling_ratio=self.cfg.scheduled_sampling)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.tgt_out.reshape(-1),
                               ignore_index=PAD, label_smoothing=self.cfg.label_smoothing, reduction="sum")
        n = batch.num_target_tokens
        return loss / max(n, 1), n

    def update(self, item) -> tuple[float, int]:
        self.model.train()
        self.schedule.apply(self.progress["global_step"])
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cfg.amp and self.device.type == "cuda")
        with autocast:
            loss, n = self.loss_lm(item) if self.cfg.kind == "lm" else self.loss_seq2seq(item)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_norm)
        self.optimizer.step()
        return float(loss.detach()), n

    # --- validation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        from training.evaluate import lm_nll, seq2seq_nll

        self.model.eval()
        if self.cfg.kind == "lm":
            nll, n = lm_nll(self.model, self.data.valid, self.device)
        else:
            nll, n = seq2seq_nll(self.model, self.data.valid, self.device)
        result = {"valid_loss": nll / max(n, 1), "valid_tokens": n}
        result["valid_ppl"] = math.exp(min(result["valid_loss"], 50))
        if self.cfg.kind == "seq2seq" and self.cfg.eval_decode:
            from training.evaluate import decode_and_score
            result.update({f"valid_{k}": v for k, v in decode_and_score(
                self.model, self.tokenizers, self.data.valid_text[: self.cfg.eval_decode], self.cfg.task,
                self.device).items()})
        return result

    # --- the loop ---------------------------------------------------------------------------------------
    def save(self, name: str) -> None:
        save_checkpoint(self.out / name, model=self.model, cfg=self.cfg, tokenizers=self.tokenizers,
                        optimizer=self.optimizer, schedule=self.schedule, progress=self.progress,
                        extra={"carry": tuple(c.cpu() for c in self.carry) if self.carry is not None else None})

    def log(self, record: dict) -> None:
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()

    def run(self) -> dict:
        cfg, p = self.cfg, self.progress
        summary = {}
        started, epoch_seconds = time.perf_counter(), 0.0
        while p["epoch"] <= cfg.epochs and not p["done"]:
            elapsed = time.perf_counter() - started
            if cfg.time_limit_minutes and elapsed + epoch_seconds > cfg.time_limit_minutes * 60:
                print(f"time limit: {elapsed / 60:.1f} min used, an epoch takes {epoch_seconds / 60:.1f}",
                      flush=True)
                break
            epoch = p["epoch"]
            plan = self.plan_epoch(epoch)
            if p["step_in_epoch"] == 0:
                self.carry = None
            bar = _progress(len(plan), epoch, cfg.epochs, enabled=cfg.progress, initial=p["step_in_epoch"])
            t0, tokens = time.perf_counter(), 0
            for i in range(p["step_in_epoch"], len(plan)):
                loss, n = self.update(plan[i])
                p["step_in_epoch"], p["global_step"] = i + 1, p["global_step"] + 1
                tokens += n
                step = p["global_step"]
                self.log({"step": step, "epoch": epoch, "loss": loss, "lr": self.schedule.lr(step - 1)})
                if step % cfg.log_every == 0 and self.writer:
                    self.writer.add_scalar("train/loss", loss, step)
                    self.writer.add_scalar("train/lr", self.schedule.lr(step - 1), step)
                if bar is not None:
                    rate = tokens / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
                    bar.update(1)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self.save(f"step-{step}.pt")
                    prune_checkpoints(self.out, cfg.keep_last)
                if cfg.max_steps and step >= cfg.max_steps:
                    self.save("last.pt")
                    if bar is not None:
                        bar.close()
                    return {"stopped_at_step": step}
            if bar is not None:
                bar.close()
            summary = self.validate()
            epoch_seconds = time.perf_counter() - t0
            summary.update(epoch=epoch, epoch_seconds=epoch_seconds, step=p["global_step"],
                           lr=self.schedule.lr(p["global_step"]),
                           train_tokens_per_s=tokens / max(time.perf_counter() - t0, 1e-9))
            improved = self.schedule.end_epoch(epoch, summary["valid_loss"])
            p["epoch"], p["step_in_epoch"] = epoch + 1, 0
            if cfg.early_stopping and self.schedule.bad_epochs >= cfg.early_stopping:
                p["done"] = True
            self.log({"epoch_end": epoch, **summary})
            if self.writer:
                for key, value in summary.items():
                    if key.startswith("valid_"):
                        self.writer.add_scalar(f"valid/{key[6:]}", value, p["global_step"])
                self.writer.flush()
            self.save("last.pt")
            if improved:
                self.save("best.pt")
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}),
                  flush=True)
        return summary

    def close(self) -> None:
        self.log_file.close()
        if self.writer:
            self.writer.close()


def _summary_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is in the [train] extra; training still works without curves
        return None
    return SummaryWriter(str(path))


def _progress(total: int, epoch: int, epochs: int, enabled: bool, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch}/{epochs}", unit="batch", dynamic_ncols=True)


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, overrides: dict | None = None) -> dict:
    trainer = Trainer(cfg, out, resume=resume, overrides=overrides)
    try:
        return trainer.run()
    finally:
        trainer.close()
