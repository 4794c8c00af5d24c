"""Log-prob processors: per-row rules that ban or penalise tokens before a token is chosen.

One call signature, `(history, scores[N, V], rows, generated_counts[N]) -> scores`, vectorised over rows
with the per-row columns of `RowParams`. `scores` are float64 log-probs owned by the caller; a processor
may change them in place and returns them. Order (the reference decoders use the same): min_new_tokens,
no_repeat_ngram_size, repetition_penalty. Nothing is renormalised afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from server.decoding.history import TokenHistory
from server.decoding.row_params import RowParams


class LogProbProcessor(Protocol):
    def __call__(self, history: TokenHistory, scores: np.ndarray, rows: RowParams,
                 generated_counts: np.ndarray) -> np.ndarray: ...


class MinNewTokens:
    """<eos> gets -inf while a row has generated fewer than its min_new_tokens."""

    def __init__(self, eos_id: int):
        if eos_id < 0:
            raise ValueError(f"eos_id must be >= 0, got {eos_id}")
        self.eos_id = eos_id

    def __call__(self, history, scores, rows, generated_counts):
        too_early = generated_counts < rows.min_new_tokens
        if too_early.any():
            scores[too_early, self.eos_id] = -np.inf
        return scores


class NoRepeatNGram:
    """Bans every token that would complete an n-gram already present in the row's history.

    With history h of length L and n = no_repeat_ngram_size, token h[j + n - 1] is banned for every
    j <= L - n with h[j : j + n - 1] == h[L - n + 1 : L] (the last n - 1 tokens); n = 1 bans every token
    seen. Rows are grouped by n (a few distinct values), never looped over.
    """

    def __call__(self, history, scores, rows, generated_counts):
        sizes = rows.no_repeat_ngram_size
        active = sizes > 0
        if not active.any():
            return scores
        for n in np.unique(sizes[active]):
            selected = np.nonzero((sizes == n) & (history.lengths >= n))[0]
            if selected.size:
                self._ban(history, scores, selected, int(n))
        return scores

    @staticmethod
    def _ban(history: TokenHistory, scores: np.ndarray, selected: np.ndarray, n: int) -> None:
        if n == 1:
            scores[selected] = np.where(history.seen[selected], -np.inf, scores[selected])
            return
        lengths = history.lengths[selected]
        tokens = history.tokens[selected, : int(lengths.max())]
        suffix_positions = lengths[:, None] - (n - 1) + np.arange(n - 1)
        suffix = np.take_along_axis(tokens, suffix_positions, axis=1)  # [R, n-1]
        windows = sliding_window_view(tokens, n - 1, axis=1)  # [R, W, n-1], window j starts at j
        starts = np.arange(windows.shape[1])
        # A window only counts if the token after it is inside the history: j + n - 1 <= L - 1.
        matches = (starts[None, :] <= (lengths - n)[:, None]) & (windows == suffix[:, None, :]).all(axis=2)
        match_rows, match_starts = np.nonzero(matches)
        banned = tokens[match_rows, match_starts + n - 1]
        scores[selected[match_rows], banned] = -np.inf


class RepetitionPenalty:
    """CTRL-style penalty on log-probs: every token already in the history has its log-prob multiplied
    by the row's penalty (>= 1). Log-probs are <= 0, so a larger factor always makes a token less likely
    (HF divides positive logits instead; log-probs have none)."""

    def __call__(self, history, scores, rows, generated_counts):
        penalised = np.nonzero(rows.repetition_penalty != 1.0)[0]
        if penalised.size:
            block = scores[penalised]
            factor = rows.repetition_penalty[penalised, None]
            scores[penalised] = np.where(history.seen[penalised], block * factor, block)
        return scores


class ProcessorChain:
    """Applies processors in order."""

    def __init__(self, processors: Sequence[LogProbProcessor]):
        self.processors = tuple(processors)

    def __call__(self, history, scores, rows, generated_counts):
        for processor in self.processors:
            scores = processor(history, scores, rows, generated_counts)
        return scores


def default_processors(eos_id: int) -> ProcessorChain:
    """The chain every strategy uses, in the documented order."""
    return ProcessorChain([MinNewTokens(eos_id), NoRepeatNGram(), RepetitionPenalty()])
