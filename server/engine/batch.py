"""The rows a model advances together, as batch-first numpy arrays: continuous batching is `filter`
(rows leave, beams reorder) and `concatenate` (rows join), each a handful of array operations.

`DecodeBatch` is the model's side of every row (recurrent state, the token to feed next, encoder
memory); `ChooserRows` is the decoding side of the greedy and sampling rows (per-row parameters, token
history, tokens generated). Beam rows' decoding side lives in `server.decoding.BeamSearch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.decoding import RowParams, TokenHistory
from server.decoding.matching import ConstraintRows
from server.engine.requests import State

CHOOSER_GROUP = 0  # `groups` value of greedy and sampling rows; beam rows hold their beam size


@dataclass(frozen=True)
class DecodeBatch:
    """Rows in batch order. Rows of one beam group keep the order of their `BeamSearch`.

    memory [B, S, M] and mask [B, S] (seq2seq only) are padded to the longest source among the rows;
    padded positions have mask 0 and memory 0, which attention ignores.
    """

    state: State  # each [B, ...] float32
    tokens: np.ndarray  # [B] int64: the token each row feeds at its next step
    owners: np.ndarray  # [B] int64: the slot of the request a row belongs to
    groups: np.ndarray  # [B] int64: CHOOSER_GROUP, or the beam size of a beam row
    memory: np.ndarray | None = None
    mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def empty(cls, state_shapes: list[tuple[int, ...]], memory_size: int | None = None) -> DecodeBatch:
        """No rows; `memory_size` (M) for seq2seq models."""
        state = tuple(np.zeros((0, *shape), dtype=np.float32) for shape in state_shapes)
        memory = mask = None
        if memory_size is not None:
            memory = np.zeros((0, 0, memory_size), dtype=np.float32)
            mask = np.zeros((0, 0), dtype=np.float32)
        empty_ints = np.zeros(0, dtype=np.int64)
        return cls(state, empty_ints, empty_ints, empty_ints, memory, mask)

    def filter(self, index: np.ndarray, memory_index: np.ndarray | None = None) -> DecodeBatch:
        """Rows `index` (boolean mask or integer indices, repeats allowed), in that order.

        Beam rows of one request share their memory, so a beam reorder need not copy it: pass
        `memory_index`, the rows whose memory each new row has (often the identity, then nothing is
        copied). Memory is also cut to the longest source that remains.
        """
        return self.advance(self.state, index, self.tokens[index], memory_index)

    def advance(self, state: State, index: np.ndarray, tokens: np.ndarray,
                memory_index: np.ndarray | None = None) -> DecodeBatch:
        """The batch after a step: rows `index` go on with the model's new `state`, feeding `tokens`."""
        memory, mask = self.memory, self.mask
        if memory is not None:
            memory_index = index if memory_index is None else memory_index
            if not _is_identity(memory_index, len(self)):
                mask = self.mask[memory_index]
                width = int(mask.sum(axis=1).max(initial=0))  # masks are ones then zeros
                # Slice first so the gather copies only what is kept (and leaves a contiguous array).
                memory = np.ascontiguousarray(self.memory[:, :width][memory_index])
                mask = np.ascontiguousarray(mask[:, :width])
        if _is_identity(index, len(self)):  # nobody left, no beam moved: nothing to gather
            return DecodeBatch(state, tokens, self.owners, self.groups, memory, mask)
        return DecodeBatch(tuple(s[index] for s in state), tokens, self.owners[index], self.groups[index],
                           memory, mask)

    @staticmethod
    def concatenate(batches: list[DecodeBatch]) -> DecodeBatch:
        """Rows of every batch, in order; memory is padded to the widest batch's source length."""
        batches = [b for b in batches if len(b)] or batches[:1]
        if len(batches) == 1:
            return batches[0]
        state = tuple(np.concatenate(parts) for parts in zip(*(b.state for b in batches), strict=True))
        memory = mask = None
        if batches[0].memory is not None:
            memory, mask = _pad_and_stack([b.memory for b in batches], [b.mask for b in batches])
        return DecodeBatch(
            state,
            np.concatenate([b.tokens for b in batches]),
            np.concatenate([b.owners for b in batches]),
            np.concatenate([b.groups for b in batches]),
            memory,
            mask,
        )


def take_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """array[rows] for ascending `rows`; a view, not a copy, when they are contiguous (the usual case:
    rows of one kind sit together after the first step)."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return array[rows[0] : rows[-1] + 1]
    return array[rows]


def _is_identity(index: np.ndarray, size: int) -> bool:
    if index.dtype == bool:
        return bool(index.all())
    return len(index) == size and bool((index == np.arange(size)).all())


def _pad_and_stack(memories: list[np.ndarray], masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    rows = sum(len(m) for m in memories)
    width = max(m.shape[1] for m in memories)
    memory = np.zeros((rows, width, memories[0].shape[2]), dtype=np.float32)
    mask = np.zeros((rows, width), dtype=np.float32)
    start = 0
    for part_memory, part_mask in zip(memories, masks, strict=True):  # per batch, not per row
        end = start + len(part_memory)
        memory[start:end, : part_memory.shape[1]] = part_memory
        mask[start:end, : part_mask.shape[1]] = part_mask
        start = end
    return memory, mask


@dataclass
class ChooserRows:
    """The greedy and sampling rows' decoding columns, in the order those rows have in the batch.

    Besides what choosing needs, each row's running totals and where its tokens go: `plain` rows (no stop
    strings, log-probs, alternatives or attention, and a tokenizer with a `TokenTable`) hand their tokens
    over as arrays, to the consumer `consumers[i]` under the key `keys[i]`.
    """

    rows: RowParams
    history: TokenHistory
    generated: np.ndarray  # [N] int64: tokens each row has generated so far (its sampling step)
    log_prob: np.ndarray  # [N] float64: the sum of the log-probs of the tokens it chose (<eos> included)
    tracked: np.ndarray  # [N] object: the row's request (`server.engine.tracking.Tracked`)
    plain: np.ndarray  # [N] bool: its tokens go out as bare ids, their text made by the consumer
    keys: np.ndarray  # [N] int64: the row's request's key with its consumer
    consumers: np.ndarray  # [N] int64: the consumer's id
    constraints: ConstraintRows  # the matcher of each row that has a constraint

    @classmethod
    def empty(cls, vocab_size: int) -> ChooserRows:
        return cls.start(RowParams.empty(), [], vocab_size)

    @classmethod
    def start(cls, rows: RowParams, histories: list[list[int]], vocab_size: int, tracked: list | None = None,
              plain: np.ndarray | None = None, keys: list[int] | None = None,
              consumers: list[int] | None = None, constraints: ConstraintRows | None = None) -> ChooserRows:
        """Rows that have generated nothing yet; `histories` are what the processors look back on. Rows are
        not plain by default, nor constrained."""
        count = len(rows)
        owners = np.empty(count, dtype=object)
        if tracked is not None:
            owners[:] = tracked
        plain = np.zeros(count, dtype=bool) if plain is None else np.asarray(plain, dtype=bool)
        ints = [np.zeros(count, dtype=np.int64) if column is None else np.asarray(column, dtype=np.int64)
                for column in (keys, consumers)]
        return cls(rows, TokenHistory.from_prompts(histories, vocab_size), np.zeros(count, dtype=np.int64),
                   np.zeros(count, dtype=np.float64), owners, plain, *ints,
                   constraints if constraints is not None else ConstraintRows.empty(count))

    def __len__(self) -> int:
        return len(self.generated)

    def advance(self, tokens: np.ndarray, log_probs: np.ndarray | None = None) -> None:
        """Every row chose `tokens` (of log-probs `log_probs`)."""
        self.history.append(tokens)
        self.generated += 1
        if log_probs is not None:
            self.log_prob += log_probs

    def generated_ids(self, row: int, drop_last: bool = False) -> list[int]:
        """The tokens row `row` generated (without the last one: an <eos>)."""
        end = int(self.history.lengths[row])
        ids = self.history.tokens[row, end - int(self.generated[row]) : end - int(drop_last)]
        return ids.tolist()

    def filter(self, index: np.ndarray) -> ChooserRows:
        return ChooserRows(self.rows.filter(index), self.history.filter(index), self.generated[index],
                           self.log_prob[index], self.tracked[index], self.plain[index], self.keys[index],
                           self.consumers[index], self.constraints.filter(index))

    @staticmethod
    def concatenate(parts: list[ChooserRows]) -> ChooserRows:
        parts = [p for p in parts if len(p)] or parts[:1]
        if len(parts) == 1:
            return parts[0]
        return ChooserRows(
            RowParams.concatenate([p.rows for p in parts]),
            TokenHistory.concatenate([p.history for p in parts]),
            *(np.concatenate([getattr(p, name) for p in parts])
              for name in ("generated", "log_prob", "tracked", "plain", "keys", "consumers")),
            ConstraintRows.concatenate([p.constraints for p in parts]),
        )
