"""The training loop shared by LMs and seq2seq models: seeded, resumable, logged, early-stopped.

It runs unchanged under torchrun (one process per rank, DistributedDataParallel): every rank plans the
same global batches from (seed, epoch) and trains on its contiguous share of each, so N ranks follow the
data order of one process with the same batch size; rank 0 alone writes the run directory.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

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
from training.distributed import DistContext, rank_seed, shard
from training.models import build_model
from training.models.rnn import detach_state
from training.prepare import build_tokenizers, load_lm_data, load_pair_data
from training.schedule import LRSchedule


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """cpu, or this process's GPU: under torchrun, rank LOCAL_RANK of a node takes GPU LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch sees no GPU")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but torch sees {count} GPU(s) on this node: "
                           f"start at most {count} processes per node (--nproc_per_node)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


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


class TrainingLoss(nn.Module):
    """The model and its summed training loss in one forward: DistributedDataParallel all-reduces the
    gradients of what its wrapped forward ran, so the loss must be computed inside it."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        super().__init__()
        self.model, self.kind = model, cfg.kind
        self.label_smoothing, self.sampling_ratio = cfg.label_smoothing, cfg.scheduled_sampling

    def forward(self, *batch):
        if self.kind == "lm":  # (inputs, targets, carried state) -> (summed loss, state after the window)
            x, y, state = batch
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
            logits, state = self.model.logits(x, lengths, state)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none",
                                   label_smoothing=self.label_smoothing)
            return (loss * lm_targets_mask(y).reshape(-1)).sum(), state
        src, src_lengths, tgt_in, tgt_out = batch
        logits = self.model(src, src_lengths, tgt_in, sampling_ratio=self.sampling_ratio)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1), ignore_index=PAD,
                               label_smoothing=self.label_smoothing, reduction="sum")


class Trainer:
    """One run directory: config.json, train_log.jsonl, tensorboard/, best.pt, last.pt, step-N.pt."""

    def __init__(self, cfg: TrainConfig, out: str | Path, resume: bool = False, overrides: dict | None = None):
        self.dist = DistContext.from_env()
        self.out = Path(out)
        payload = None
        if resume:
            # Every rank reads the checkpoint: on several machines OUT must be shared storage.
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
        self.device = pick_device(cfg.device, self.dist.local_rank)
        if cfg.kind == "lm" and cfg.batch_size < self.dist.world_size:
            raise ValueError(f"batch_size must be at least the number of ranks ({self.dist.world_size}) for an "
                             f"LM, whose batch is split by rows, got {cfg.batch_size}")
        self.dist.init(self.device, cfg.dist_timeout_seconds)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if payload:
            self.tokenizers = tokenizers_from_checkpoint(payload)
        else:  # rank 0 trains them and hands them out, so every rank encodes with the very same vocabulary
            built = build_tokenizers(cfg) if self.dist.is_main else None
            texts = self.dist.broadcast({r: t.to_str() for r, t in built.items()} if built else None, "tokenizers")
            self.tokenizers = built or tokenizers_from_checkpoint({"tokenizers": texts})
        if cfg.kind == "lm":
            self.data = load_lm_data(cfg, self.tokenizers["text"])
        else:
            self.data = load_pair_data(cfg, self.tokenizers)
        # Every rank builds the same initial weights (DDP also broadcasts rank 0's), then draws its own masks.
        self.model = build_model(cfg.kind, model_args_for(cfg, self.tokenizers)).to(self.device)
        if not self.dist.is_main:
            torch.manual_seed(rank_seed(cfg.seed, self.dist.rank))
        self.net = TrainingLoss(self.model, cfg)
        if self.dist.enabled:
            self.net = DistributedDataParallel(self.net, device_ids=[self.device.index] if self.device.type == "cuda"
                                               else None)
        params = self.model.parameters()
        if cfg.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                             weight_decay=cfg.weight_decay)
        self.schedule = LRSchedule(cfg, self.optimizer)
        self.progress = {"epoch": 1, "step_in_epoch": 0, "global_step": 0, "done": False}
        self.carry = None  # LM state carried between BPTT windows
        self.log_file = self.writer = None
        if self.dist.is_main:
            cfg.save(self.out / "config.json", world_size=self.dist.world_size)
            self.log_file = open(self.out / "train_log.jsonl", "a")
            self.writer = _summary_writer(self.out / "tensorboard")
        if payload:
            self.model.load_state_dict(payload["state_dict"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.schedule.load_state_dict(payload["schedule"])
            self.progress = dict(payload["progress"])
            self._resume_state(payload)

    def _resume_state(self, payload: dict) -> None:
        """Carried LM state and random streams. The checkpoint holds every row's state, whatever the number of
        ranks that wrote it, and each rank's random state; on another number of ranks the data order is still
        the same but dropout draws differ, and the log says so."""
        extra, rank, world = payload["extra"], self.dist.rank, self.dist.world_size
        carry = extra.get("carry")
        if carry is not None:
            rows = shard(self.cfg.batch_size, rank, world)
            self.carry = tuple(c[rows].to(self.device) for c in carry)
        saved_world = extra.get("world_size", 1)
        restore_rng(payload)  # rank 0's torch, CUDA and Python streams
        by_rank = extra.get("rng_by_rank")
        if saved_world == world and by_rank:
            _set_rng(by_rank[rank], self.device)
        elif not self.dist.is_main:
            torch.manual_seed(rank_seed(self.cfg.seed, rank) + self.progress["global_step"])
        record = {"resumed_at_step": self.progress["global_step"], "world_size": world,
                  "checkpoint_world_size": saved_world}
        if saved_world != world:
            record["note"] = (f"resumed a {saved_world}-rank run on {world} rank(s): same data order, "
                              "but dropout/sampling draws differ from an uninterrupted run")
            if self.dist.is_main:
                print(f"seqserve train: {record['note']}", flush=True)
        self.log(record)

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
    # Each returns (this rank's summed loss, the target tokens of the whole global batch). Every rank knows
    # the global count without asking, so dividing by it (times the world size DDP divides by) makes the
    # all-reduced gradient exactly the one-process gradient of the global batch's mean loss.
    def loss_lm(self, window) -> tuple[torch.Tensor, int]:
        start, length = window
        data = self._lm_data  # [global batch rows, N]; this rank trains its own contiguous rows
        rows = shard(data.shape[0], self.dist.rank, self.dist.world_size)
        x = data[rows, start: start + length].to(self.device)
        y = data[rows, start + 1: start + 1 + length].to(self.device)
        total = int(lm_targets_mask(data[:, start + 1: start + 1 + length]).sum())
        if self.carry is None or self.cfg.overfit_batch:
            self.carry = self.model.initial_state(x.shape[0], self.device)
        loss_sum, state = self.net(x, y, self.carry)
        self.carry = detach_state(state)  # this rank's rows only
        return loss_sum, total

    def loss_seq2seq(self, indices) -> tuple[torch.Tensor, int]:
        pairs = [self.data.train[i] for i in indices]
        total = sum(len(t) + 1 for _, t in pairs)  # targets + <eos>, as PairBatch.num_target_tokens counts
        mine, weight = pairs[shard(len(pairs), self.dist.rank, self.dist.world_size)], 1.0
        if not mine:  # a last batch smaller than the world: DDP still needs this rank's (zero) gradients
            mine, weight = pairs[:1], 0.0
        batch = make_pair_batch(mine).to(self.device)
        return self.net(batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_out) * weight, total

    def update(self, item) -> tuple[float, int]:
        self.net.train()
        self.schedule.apply(self.progress["global_step"])
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cfg.amp and self.device.type == "cuda")
        with autocast:
            loss_sum, total = self.loss_lm(item) if self.cfg.kind == "lm" else self.loss_seq2seq(item)
            loss = loss_sum / max(total, 1) * self.dist.world_size
        self.optimizer.zero_grad(set_to_none=True)
        self.dist.guard("the gradient all-reduce", loss.backward)
        if self.cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_norm)
        self.optimizer.step()
        mean = self.dist.sum(loss_sum.detach().float(), "the batch loss") / max(total, 1)
        return float(mean), total

    # --- validation -----------------------------------------------------------------------------------
    def validate(self) -> dict:
        """Computed once, on rank 0, and handed to every rank: the schedule and early stopping agree."""
        return self.dist.broadcast(self._validate() if self.dist.is_main else None, "the validation figures")

    @torch.no_grad()
    def _validate(self) -> dict:
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
        """Every rank calls this (the carried state and random streams are gathered); rank 0 writes.

        The checkpoint does not depend on the number of ranks: the carried LM state is every row's, in order.
        """
        mine = {"carry": tuple(c.cpu() for c in self.carry) if self.carry is not None else None,
                "rng": _get_rng(self.device)}
        parts = self.dist.gather(mine, "the checkpoint's state")
        if not self.dist.is_main:
            return
        carry = None
        if parts[0]["carry"] is not None:
            carry = tuple(torch.cat(tensors) for tensors in zip(*(p["carry"] for p in parts), strict=True))
        extra = {"carry": carry, "world_size": self.dist.world_size,
                 "rng_by_rank": [p["rng"] for p in parts] if self.dist.enabled else None}
        save_checkpoint(self.out / name, model=self.model, cfg=self.cfg, tokenizers=self.tokenizers,
                        optimizer=self.optimizer, schedule=self.schedule, progress=self.progress, extra=extra)

    def log(self, record: dict) -> None:
        if self.log_file is None:  # not rank 0
            return
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()

    def run(self) -> dict:
        cfg, p = self.cfg, self.progress
        summary = {}
        started, epoch_seconds = time.perf_counter(), 0.0
        while p["epoch"] <= cfg.epochs and not p["done"]:
            elapsed = time.perf_counter() - started
            over = bool(cfg.time_limit_minutes) and elapsed + epoch_seconds > cfg.time_limit_minutes * 60
            if cfg.time_limit_minutes and self.dist.broadcast(over, "the time-limit decision"):
                if self.dist.is_main:
                    print(f"time limit: {elapsed / 60:.1f} min used, an epoch takes {epoch_seconds / 60:.1f}",
                          flush=True)
                break
            epoch = p["epoch"]
            plan = self.plan_epoch(epoch)
            if p["step_in_epoch"] == 0:
                self.carry = None
            bar = _progress(len(plan), epoch, cfg.epochs, enabled=cfg.progress and self.dist.is_main,
                            initial=p["step_in_epoch"])
            t0, tokens = time.perf_counter(), 0
            for i in range(p["step_in_epoch"], len(plan)):
                loss, n = self.update(plan[i])
                p["step_in_epoch"], p["global_step"] = i + 1, p["global_step"] + 1
                tokens += n
                step = p["global_step"]
                # tokens: the global batch's target tokens (all ranks); seconds: since this process's loop began
                self.log({"step": step, "epoch": epoch, "loss": loss, "lr": self.schedule.lr(step - 1), "tokens": n,
                          "seconds": round(time.perf_counter() - started, 4)})
                if step % cfg.log_every == 0 and self.writer:
                    self.writer.add_scalar("train/loss", loss, step)
                    self.writer.add_scalar("train/lr", self.schedule.lr(step - 1), step)
                if bar is not None:
                    rate = tokens / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
                    bar.update(1)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self.save(f"step-{step}.pt")
                    if self.dist.is_main:
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
            if self.dist.is_main:
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}),
                      flush=True)
        return summary

    def close(self, failed: bool = False) -> None:
        if self.log_file is not None:
            self.log_file.close()
        if self.writer:
            self.writer.close()
        if not failed:  # after a failed collective the group may be unusable; the process exit tears it down
            self.dist.close()


def _get_rng(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


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
        summary = trainer.run()
    except BaseException:
        trainer.close(failed=True)
        raise
    trainer.close()
    return summary
