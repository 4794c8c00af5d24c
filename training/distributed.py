"""The training loop's view of torchrun: which rank this process is, its share of a batch, and the few
collectives the loop needs (gloo on CPU, NCCL for CUDA tensors), each with a timeout.

Without torchrun (or with one process) every helper is the identity, so a single-process run takes the
same code path and produces the same numbers as before.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

_COLLECTIVE_ERROR = re.compile(r"gloo|nccl|timed out|connection|peer|socket", re.IGNORECASE)


class CollectiveFailed(RuntimeError):
    """A collective with the other ranks failed: a rank died, hung past the timeout or lost its connection."""


@dataclass
class DistContext:
    rank: int = 0  # this process's place among all processes of the run (torchrun's RANK)
    world_size: int = 1  # processes in the run, over every node (WORLD_SIZE)
    local_rank: int = 0  # place on this machine (LOCAL_RANK): picks this process's GPU
    timeout_seconds: float = 0.0  # the collectives' timeout, set by init()

    @classmethod
    def from_env(cls) -> DistContext:
        """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for each worker; a plain process has none of them."""
        def read(name: str, default: int) -> int:
            value = os.environ.get(name, "")
            if not value:
                return default
            if not value.isdigit():
                raise ValueError(f"environment variable {name} must be a non-negative integer, got {value!r}")
            return int(value)

        world = read("WORLD_SIZE", 1)
        rank, local = read("RANK", 0), read("LOCAL_RANK", 0)
        if world < 1 or rank >= world:
            raise ValueError(f"RANK must be in [0, WORLD_SIZE), got RANK={rank} WORLD_SIZE={world}")
        return cls(rank=rank, world_size=world, local_rank=local)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run directory: checkpoints, logs, TensorBoard events, the progress bar."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    # --- the process group ----------------------------------------------------------------------------
    def init(self, device: torch.device, timeout_seconds: float) -> None:
        """Join the other ranks. CPU tensors (and pickled objects) go through gloo; on CUDA the gradients go
        through NCCL. The timeout bounds every later collective, so a hung rank ends the run with an error."""
        self.timeout_seconds = timeout_seconds
        if not self.enabled or dist.is_initialized():
            return
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_seconds), **kwargs)
        except Exception as error:  # a rendezvous that never completes is the same failure as a lost rank
            raise CollectiveFailed(self._message("joining the process group", timeout_seconds, error)) from error

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def _message(self, what: str, timeout_seconds: float, error: BaseException) -> str:
        return (f"{self.describe()}: {what} failed: another rank died, hung for more than "
                f"dist_timeout_seconds={timeout_seconds:g}, or lost its connection ({type(error).__name__}: "
                f"{str(error).strip().splitlines()[0] if str(error).strip() else 'no detail'})")

    def _guard(self, what: str, call):
        try:
            return call()
        except RuntimeError as error:  # gloo reports a lost or silent peer as a plain RuntimeError
            if not isinstance(error, dist.DistError) and not _COLLECTIVE_ERROR.search(str(error)):
                raise
            raise CollectiveFailed(self._message(what, self.timeout_seconds, error)) from error

    def guard(self, what: str, call):
        """Run `call` (which may hold a collective: DDP's backward does) and name a failure as the run's."""
        return self._guard(what, call) if self.enabled else call()

    # --- collectives --------------------------------------------------------------------------------
    def broadcast(self, obj, what: str):
        """Rank 0's `obj` on every rank (validation figures, decisions, tokenizers)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        self._guard(f"broadcasting {what}", lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def gather(self, obj, what: str) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        self._guard(f"gathering {what}", lambda: dist.all_gather_object(out, obj))
        return out

    def sum(self, value: torch.Tensor, what: str) -> torch.Tensor:
        """The sum over ranks of a (small) tensor."""
        if not self.enabled:
            return value
        total = value.detach().clone()
        self._guard(f"summing {what}", lambda: dist.all_reduce(total, op=dist.ReduceOp.SUM))
        return total


def shard(count: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s contiguous part of `count` items: sizes differ by at most one, the first ranks get the
    extra ones (as torch.tensor_split). Concatenated in rank order the parts are the whole, in order."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def rank_seed(seed: int, rank: int) -> int:
    """Rank r > 0 draws its own dropout masks; rank 0 keeps the single-process stream."""
    return seed if rank == 0 else seed * 1_000_003 + 7919 * rank
