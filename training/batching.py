"""Turning token ids into training batches: a BPTT stream for LMs, length buckets for seq2seq.

Batch order for an epoch is a function of (seed, epoch) only, so a run resumed mid-epoch replays
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.tokenizer import special_ids

SPECIAL = special_ids()
PAD, BOS, EOS = SPECIAL["<pad>"], SPECIAL["<bos>"], SPECIAL["<eos>"]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


# --- language models --------------------------------------------------------------------------

def lm_stream(docs_ids: list[list[int]]) -> torch.Tensor:
    """All documents as one stream: <bos> doc <eos> <bos> doc <eos> ..."""
    flat: list[int] = []
    for ids in docs_ids:
        flat.append(BOS)
        flat.extend(ids)
        flat.append(EOS)
    return torch.tensor(flat, dtype=torch.long)


def batchify(stream: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[N] -> [batch_size, N // batch_size]: each row is a contiguous slice read left to right."""
    n = stream.numel() // batch_size
    if n < 2:
        raise ValueError(f"the text has {stream.numel()} tokens, too few for batch_size {batch_size}")
    return stream[: n * batch_size].view(batch_size, n)


def bptt_windows(data: torch.Tensor, bptt: int) -> list[tuple[int, int]]:
    """(start, length) of each window; targets are the inputs shifted by one."""
    total = data.shape[1] - 1
    return [(i, min(bptt, total - i)) for i in range(0, total, bptt)]


def lm_targets_mask(targets: torch.Tensor) -> torch.Tensor:
    """<bos> always follows <eos>; predicting it teaches nothing and would flatter bits-per-char."""
    return targets != BOS


# --- seq2seq ----------------------------------------------------------------------------------

@dataclass
class PairBatch:
    src: torch.Tensor  # [B, S] source ids, padded
    src_lengths: torch.Tensor  # [B]
    tgt_in: torch.Tensor  # [B, T] <bos> + target
    tgt_out: torch.Tensor  # [B, T] target + <eos>, padded with PAD

    def to(self, device) -> PairBatch:
        return PairBatch(*(t.to(device) for t in (self.src, self.src_lengths, self.tgt_in, self.tgt_out)))

    @property
    def num_target_tokens(self) -> int:
        return int((self.tgt_out != PAD).sum())


def pad(seqs: list[list[int]], value: int = PAD) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def make_pair_batch(pairs: list[tuple[list[int], list[int]]]) -> PairBatch:
    src = [s if s else [SPECIAL["<unk>"]] for s, _ in pairs]
    return PairBatch(
        src=pad(src),
        src_lengths=torch.tensor([len(s) for s in src], dtype=torch.long),
        tgt_in=pad([[BOS] + t for _, t in pairs]),
        tgt_out=pad([t + [EOS] for _, t in pairs]),
    )


def bucketed_batches(pairs: list[tuple[list[int], list[int]]], batch_size: int,
                     generator: torch.Generator, shuffle: bool = True) -> list[list[int]]:
    """Indices of pairs grouped by similar source length (less padding), batches in random order."""
    n = len(pairs)
    if shuffle:
        # Random tie-breaking within a length keeps batches varied from epoch to epoch.
        noise = torch.rand(n, generator=generator).tolist()
    else:
        noise = [0.0] * n
    order = sorted(range(n), key=lambda i: (len(pairs[i][0]), len(pairs[i][1]), noise[i]))
    batches = [order[i: i + batch_size] for i in range(0, n, batch_size)]
    if shuffle:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    return batches
