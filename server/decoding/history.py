"""The tokens each row has seen (prompt + generated), kept as padded arrays for vectorised processors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class TokenHistory:
    """tokens[N, capacity] int32 (valid up to lengths[N]) and seen[N, V] bool (token occurred in the row).

    `append` writes in place and doubles the capacity when a row fills it; `filter` and `concatenate`
    return new histories, mirroring what the batch does to its state.
    """

    __slots__ = ("tokens", "lengths", "seen")

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray, seen: np.ndarray):
        self.tokens = tokens
        self.lengths = lengths
        self.seen = seen

    @classmethod
    def from_prompts(cls, prompts: Sequence[Sequence[int]], vocab_size: int,
                     min_capacity: int = 16) -> TokenHistory:
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        capacity = max(min_capacity, int(lengths.max(initial=0)) * 2)
        tokens = np.zeros((len(prompts), capacity), dtype=np.int32)
        seen = np.zeros((len(prompts), vocab_size), dtype=bool)
        for row, prompt in enumerate(prompts):  # once per request, not per step
            tokens[row, : len(prompt)] = prompt
            seen[row, np.asarray(prompt, dtype=np.int64)] = True
        return cls(tokens, lengths, seen)

    @classmethod
    def empty(cls, vocab_size: int, capacity: int = 16) -> TokenHistory:
        return cls(np.zeros((0, capacity), dtype=np.int32), np.zeros(0, dtype=np.int64),
                   np.zeros((0, vocab_size), dtype=bool))

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def vocab_size(self) -> int:
        return self.seen.shape[1]

    def append(self, new_tokens: np.ndarray) -> None:
        """Add one token to every row."""
        if len(self.lengths) == 0:
            return
        capacity = self.tokens.shape[1]
        if int(self.lengths.max()) >= capacity:
            grown = np.zeros((len(self.lengths), capacity * 2), dtype=np.int32)
            grown[:, :capacity] = self.tokens
            self.tokens = grown
        rows = np.arange(len(self.lengths))
        self.tokens[rows, self.lengths] = new_tokens
        self.seen[rows, new_tokens] = True
        self.lengths += 1

    def filter(self, index: np.ndarray) -> TokenHistory:
        """Rows `index` (a boolean mask or integer indices, repeats allowed), in that order."""
        return TokenHistory(self.tokens[index], self.lengths[index], self.seen[index])

    @staticmethod
    def concatenate(parts: list[TokenHistory]) -> TokenHistory:
        if not parts:
            raise ValueError("concatenate needs at least one history (it carries the vocabulary size)")
        if len({p.vocab_size for p in parts}) != 1:
            raise ValueError("histories of different vocabulary sizes cannot be concatenated")
        capacity = max(p.tokens.shape[1] for p in parts)
        tokens = np.zeros((sum(len(p) for p in parts), capacity), dtype=np.int32)
        start = 0
        for part in parts:  # per part (a handful of batches), not per row
            tokens[start : start + len(part), : part.tokens.shape[1]] = part.tokens
            start += len(part)
        return TokenHistory(tokens, np.concatenate([p.lengths for p in parts]),
                            np.concatenate([p.seen for p in parts]))
