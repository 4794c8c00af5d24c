"""Learning-rate schedule: linear warmup, then reduce-on-plateau or step decay, floored at min_lr."""

from __future__ import annotations

from training.config import TrainConfig


class LRSchedule:
    def __init__(self, cfg: TrainConfig, optimizer):
        self.cfg = cfg
        self.optimizer = optimizer
        self.factor = 1.0  # accumulated decay
        self.best = float("inf")
        self.bad_epochs = 0
        self.apply(0)

    def lr(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.cfg.warmup_steps) if self.cfg.warmup_steps else 1.0
        return max(self.cfg.lr * self.factor, self.cfg.min_lr) * warm

    def apply(self, step: int) -> float:
        lr = self.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def end_epoch(self, epoch: int, valid_loss: float) -> bool:
        """Update after validation; True when the epoch improved on the best so far."""
        improved = valid_loss < self.best - 1e-6
        if improved:
            self.best, self.bad_epochs = valid_loss, 0
        else:
            self.bad_epochs += 1
        if self.cfg.schedule == "plateau" and not improved and self.bad_epochs > self.cfg.lr_patience:
            self.factor *= self.cfg.lr_decay
        elif (self.cfg.schedule == "step" and epoch >= self.cfg.start_decay_epoch
              and (epoch - self.cfg.start_decay_epoch) % self.cfg.step_epochs == 0):
            self.factor *= self.cfg.lr_decay
        return improved

    def state_dict(self) -> dict:
        return {"factor": self.factor, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.factor, self.best, self.bad_epochs = state["factor"], state["best"], state["bad_epochs"]
