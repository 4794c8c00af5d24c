"""Chooses the next token of every greedy and sampling row in one vectorised call."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from server.decoding.history import TokenHistory
from server.decoding.matching import AllowedTokens, apply_allowed
from server.decoding.processors import ProcessorChain, default_processors
from server.decoding.row_params import BEAM, GREEDY, SAMPLE, RowParams
from server.decoding.sampling import sample_tokens
from server.decoding.selection import stable_top_k


class TopAlternatives(NamedTuple):
    """The most probable tokens per row, best first; row i uses its first rows.top_logprobs[i] columns
    (rows that asked for none hold -1 / NaN)."""

    token_ids: np.ndarray  # [N, A] int64
    log_probs: np.ndarray  # [N, A] float64


class Choice(NamedTuple):
    tokens: np.ndarray  # [N] int64
    log_probs: np.ndarray  # [N] float64: the chosen tokens' processed log-probs
    alternatives: TopAlternatives | None  # None when no row asked for top_logprobs


class TokenChooser:
    """Processors, then argmax for greedy rows and seeded draws for sampling rows.

    Reported log-probs are the processed ones (after min_new_tokens, no_repeat_ngram_size and
    repetition_penalty, before temperature/top-k/top-p): the same values beam search ranks by, and the
    model's own log-probs when no processor applies. A constraint's mask (`allowed`) comes last in that
    chain: it sets what it forbids to -inf and changes nothing else.
    """

    def __init__(self, eos_id: int, processors: ProcessorChain | None = None):
        self.eos_id = eos_id
        self.processors = processors if processors is not None else default_processors(eos_id)
        # With the default chain, greedy rows without penalties need no float64 copy of the log-probs.
        self._default_chain = processors is None

    def choose(self, log_probs: np.ndarray, rows: RowParams, history: TokenHistory,
               step_counts: np.ndarray, allowed: AllowedTokens | None = None) -> Choice:
        """log_probs[N, V] from the model; step_counts[N] = tokens each row has generated so far; `allowed`:
        the tokens the constrained rows may choose (None: no row is constrained)."""
        if np.any(rows.strategy == BEAM):
            raise ValueError("beam rows are decoded by BeamSearch, not TokenChooser")
        if self._argmax_suffices(rows):
            return self._argmax(log_probs, rows, step_counts, allowed)
        scores = np.array(log_probs, dtype=np.float64)  # a copy the processors may write into
        scores = self.processors(history, scores, rows, step_counts)
        scores = apply_allowed(scores, allowed, log_probs)

        tokens = scores.argmax(axis=1)  # first maximum on ties, like torch.argmax
        sampling = np.nonzero(rows.strategy == SAMPLE)[0]
        if sampling.size:
            tokens[sampling] = sample_tokens(
                scores[sampling], rows.temperature[sampling], rows.top_k[sampling], rows.top_p[sampling],
                rows.seed[sampling], step_counts[sampling])
        chosen = scores[np.arange(len(tokens)), tokens]
        return Choice(tokens, chosen, self._alternatives(scores, rows))

    def _argmax_suffices(self, rows: RowParams) -> bool:
        """Every row greedy, and no processor of the default chain but min_new_tokens can apply."""
        return (self._default_chain and bool(np.all(rows.strategy == GREEDY))
                and not rows.no_repeat_ngram_size.any() and bool(np.all(rows.repetition_penalty == 1.0))
                and not rows.top_logprobs.any())

    def _argmax(self, log_probs: np.ndarray, rows: RowParams, step_counts: np.ndarray,
                allowed: AllowedTokens | None) -> Choice:
        """What `choose` gives such rows, without copying the whole array to float64: argmax on the model's
        floats (widening is exact and keeps their order), and again, <eos> banned, for the rows whose
        argmax is an <eos> that min_new_tokens forbids; constrained rows take the argmax of their allowed
        tokens (<eos> banned too when too early, unless it is all they may choose)."""
        constrained = np.zeros(len(log_probs), dtype=bool)
        if allowed is None:
            tokens = log_probs.argmax(axis=1)
        elif len(allowed.rows) == len(log_probs):  # every row constrained: one pass (the bias is this step's)
            constrained[:] = True
            tokens = self._allowed_argmax(np.add(log_probs, allowed.bias, out=allowed.bias), allowed,
                                          np.arange(len(log_probs)), rows, step_counts)
        else:
            tokens = log_probs.argmax(axis=1)
            constrained[allowed.rows] = True
            # A row whose own argmax is allowed (and no <eos> that min_new_tokens forbids) keeps it.
            first = tokens[allowed.rows]
            redo = ~allowed.mask[np.arange(len(first)), first]
            redo |= (first == self.eos_id) & (step_counts[allowed.rows] < rows.min_new_tokens[allowed.rows])
            again = np.flatnonzero(redo)
            if again.size:
                block = log_probs[allowed.rows[again]] + allowed.bias[again]
                tokens[allowed.rows[again]] = self._allowed_argmax(block, allowed, again, rows, step_counts)
        again = np.nonzero((tokens == self.eos_id) & (step_counts < rows.min_new_tokens) & ~constrained)[0]
        if again.size:
            scores = np.array(log_probs[again], dtype=np.float64)
            scores[:, self.eos_id] = -np.inf
            tokens[again] = scores.argmax(axis=1)
        chosen = log_probs[np.arange(len(tokens)), tokens].astype(np.float64)
        return Choice(tokens, chosen, None)

    def _allowed_argmax(self, block: np.ndarray, allowed: AllowedTokens, which: np.ndarray, rows: RowParams,
                        step_counts: np.ndarray) -> np.ndarray:
        """Argmax of `block` (log-probs + bias of the constrained rows `which`), <eos> banned where
        min_new_tokens forbids it unless it is all the constraint allows."""
        own = allowed.rows[which]
        early = np.flatnonzero((step_counts[own] < rows.min_new_tokens[own]) & ~allowed.only_end[which])
        block[early, self.eos_id] = -np.inf
        return block.argmax(axis=1)

    @staticmethod
    def _alternatives(scores: np.ndarray, rows: RowParams) -> TopAlternatives | None:
        width = min(int(rows.top_logprobs.max(initial=0)), scores.shape[1])
        if width == 0:
            return None
        asking = np.nonzero(rows.top_logprobs > 0)[0]
        token_ids = np.full((len(scores), width), -1, dtype=np.int64)
        values = np.full((len(scores), width), np.nan)
        token_ids[asking], values[asking] = stable_top_k(scores[asking], width)
        return TopAlternatives(token_ids, values)
