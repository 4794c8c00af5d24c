"""Beam search for many requests at once: requests of one beam size K stacked as [R, K] rows.

The engine keeps one `BeamSearch` per beam size. Per step it passes the model's log-probs for the
group's R*K rows and gets back the tokens to feed and the parent row of every surviving row (reorder the
state with `state[parent_rows]`); requests join and leave between steps (continuous batching).

Algorithm (the PyTorch reference `training.models.decoding.beam_search` is the same, token for token):
- A request starts with one live beam (score 0) and K - 1 dead ones (-inf), so step 0 has no duplicates.
- Each step: processed log-probs (see `processors.py`, not renormalised) are added to the live scores;
  over the K*V candidates the top 2K are taken in descending order, ties by lower flat index
  (beam * V + token) first, i.e. a stable descending sort. In that order: an <eos> candidate of rank < K
  finishes a hypothesis (score = sum log-probs / lp(length), length excluding <eos>); an <eos> of rank
  >= K is dropped (as in HF); other candidates fill the K live beams. -inf candidates are skipped, and
  empty beam slots stay dead (-inf).
- When the generated length reaches max_new_tokens every live beam finishes with reason "length".
- A request is done when it has >= n_best finished hypotheses and either early_stopping is set, or no
  live beam can still beat the n_best-th: best_live / max(lp(length), lp(max_new_tokens)) <= that score
  (the bound of `best_live` over every possible ending, valid for any alpha, see the reference module).
- Results: the n_best highest scores, ties in order of finishing.
- A constrained request has a matcher per row (`constraints`); its mask comes after the processors, and
  a surviving row's matcher is its parent's (copied where a parent has several children), then takes the
  row's token.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np

from server.decoding.history import TokenHistory
from server.decoding.hypothesis import FinishReason, Hypothesis, gnmt_length_penalty
from server.decoding.matching import AllowedTokens, ConstraintRows, apply_allowed
from server.decoding.params import DecodingParams
from server.decoding.processors import ProcessorChain, default_processors
from server.decoding.row_params import RowParams
from server.decoding.selection import stable_top_k


class BeamStep(NamedTuple):
    next_tokens: np.ndarray  # [R'*K] tokens to feed the surviving rows next
    parent_rows: np.ndarray  # [R'*K] row (before this step) each surviving row continues
    finished: list[tuple[Hashable, Hypothesis]]  # every hypothesis finished this step, kept in n-best or not
    done: dict[Hashable, list[Hypothesis]]  # requests that finished this step -> n-best, best first


class BeamSearch:
    """Beam state of every request with this beam size: live scores, histories, finished hypotheses."""

    def __init__(self, beam_size: int, vocab_size: int, eos_id: int,
                 processors: ProcessorChain | None = None):
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.beam_size = beam_size
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.processors = processors if processors is not None else default_processors(eos_id)
        self.request_ids: list[Hashable] = []
        # Per row (R*K).
        self.history = TokenHistory.empty(vocab_size)
        self.rows = RowParams.empty()
        self.constraints = ConstraintRows.empty()
        self._live_scores = np.zeros((0, beam_size))
        # Per request (R).
        self._generated = np.zeros(0, dtype=np.int64)
        self._prompt_lengths = np.zeros(0, dtype=np.int64)
        self._max_new_tokens = np.zeros(0, dtype=np.int64)
        self._n_best = np.zeros(0, dtype=np.int64)
        self._early_stopping = np.zeros(0, dtype=bool)
        self._length_penalties = np.ones((0, 1))  # [R, max_new + 1]: lp(L), computed once per request
        self._finished_count = np.zeros(0, dtype=np.int64)
        self._worst_kept = np.zeros(0)  # the n_best-th finished score; -inf until there are n_best
        self._kept: list[list[tuple[float, int, Hypothesis]]] = []  # best n_best, sorted by (-score, order)
        self._finish_order = 0

    def __len__(self) -> int:
        """Number of requests."""
        return len(self.request_ids)

    @property
    def num_rows(self) -> int:
        return len(self.request_ids) * self.beam_size

    def join(self, request_ids: Sequence[Hashable], params: Sequence[DecodingParams],
             prompts: Sequence[Sequence[int]] | None = None, constraints: ConstraintRows | None = None) -> None:
        """Add requests after the current ones; their K rows each follow in the same order.

        The engine appends each request's state repeated K times (`np.repeat(state, K, axis=0)`) and
        feeds its start token (<bos>, or the last prompt token) to all K rows at the next step.
        `prompts` are the tokens no_repeat_ngram_size and repetition_penalty look back on (None: none);
        `constraints` the matchers of the K rows of every request, in row order (None: no constraint).
        """
        k = self.beam_size
        prompts = [list(p) for p in prompts] if prompts is not None else [[] for _ in request_ids]
        if not (len(request_ids) == len(params) == len(prompts)):
            raise ValueError("request_ids, params and prompts must have the same length")
        if len(set(request_ids) | set(self.request_ids)) != len(request_ids) + len(self.request_ids):
            raise ValueError("request ids must be unique within a beam group")
        for p in params:
            if p.strategy != "beam" or p.beam_size != k:
                raise ValueError(f"this group holds beam_size={k} requests, got {p.strategy} with "
                                 f"beam_size={p.beam_size}")
        if not request_ids:
            return
        self.request_ids.extend(request_ids)
        beam_prompts = [p for p in prompts for _ in range(k)]
        self.history = TokenHistory.concatenate(
            [self.history, TokenHistory.from_prompts(beam_prompts, self.vocab_size)])
        self.rows = RowParams.concatenate([self.rows, *(RowParams.from_params(p, k) for p in params)])
        self.constraints = ConstraintRows.concatenate(
            [self.constraints, constraints if constraints is not None else ConstraintRows.empty(len(params) * k)])
        live = np.full((len(params), k), -np.inf)
        live[:, 0] = 0.0
        self._live_scores = np.concatenate([self._live_scores, live])
        self._generated = _extended(self._generated, [0] * len(params))
        self._prompt_lengths = _extended(self._prompt_lengths, [len(p) for p in prompts])
        self._max_new_tokens = _extended(self._max_new_tokens, [p.max_new_tokens for p in params])
        self._n_best = _extended(self._n_best, [p.n_best for p in params])
        self._early_stopping = _extended(self._early_stopping, [p.early_stopping for p in params])
        self._finished_count = _extended(self._finished_count, [0] * len(params))
        self._worst_kept = _extended(self._worst_kept, [-np.inf] * len(params))
        width = max(self._length_penalties.shape[1], max(p.max_new_tokens for p in params) + 1)
        table = np.ones((len(self.request_ids), width))
        old = len(self._length_penalties)
        table[:old, : self._length_penalties.shape[1]] = self._length_penalties
        for i, p in enumerate(params):  # once per joining request
            table[old + i, : p.max_new_tokens + 1] = [gnmt_length_penalty(n, p.length_penalty)
                                                      for n in range(p.max_new_tokens + 1)]
        self._length_penalties = table
        self._kept.extend([] for _ in params)

    def leave(self, request_ids: Sequence[Hashable]) -> np.ndarray:
        """Drop requests (cancelled, deadline passed); return the row indices the engine keeps."""
        leaving = set(request_ids)
        keep = np.array([rid not in leaving for rid in self.request_ids], dtype=bool)
        return self._keep_requests(keep)

    def step(self, log_probs: np.ndarray, allowed: AllowedTokens | None = None) -> BeamStep:
        """Advance every request by one token, given the model's log-probs [R*K, V] for its rows and the
        tokens its constrained rows may choose (`allowed`, see `matching.allowed_tokens`)."""
        k, vocab = self.beam_size, self.vocab_size
        n_requests = len(self.request_ids)
        if log_probs.shape != (n_requests * k, vocab):
            raise ValueError(f"log_probs must be [{n_requests * k}, {vocab}], got {list(log_probs.shape)}")
        scores = np.array(log_probs, dtype=np.float64)
        scores = self.processors(self.history, scores, self.rows, np.repeat(self._generated, k))
        scores = apply_allowed(scores, allowed, log_probs)
        candidates = (self._live_scores.reshape(-1, 1) + scores).reshape(n_requests, k * vocab)
        flat, values = stable_top_k(candidates, 2 * k)
        beams, tokens = np.divmod(flat, vocab)
        alive = values > -np.inf
        is_eos = tokens == self.eos_id
        finishing = alive & is_eos & (np.arange(flat.shape[1]) < k)
        continuing = alive & ~is_eos
        slot = np.cumsum(continuing, axis=1) - 1
        taken_request, taken_rank = np.nonzero(continuing & (slot < k))
        taken_slot = slot[taken_request, taken_rank]
        parents = np.zeros((n_requests, k), dtype=np.int64)
        next_tokens = np.full((n_requests, k), self.eos_id, dtype=np.int64)  # dead slots feed <eos>, unused
        live = np.full((n_requests, k), -np.inf)
        parents[taken_request, taken_slot] = beams[taken_request, taken_rank]
        next_tokens[taken_request, taken_slot] = tokens[taken_request, taken_rank]
        live[taken_request, taken_slot] = values[taken_request, taken_rank]
        parent_rows = (np.arange(n_requests)[:, None] * k + parents).reshape(-1)

        finished = []
        for r, rank in zip(*np.nonzero(finishing), strict=True):  # Python only where a hypothesis finishes
            row = r * k + beams[r, rank]
            finished.append(self._finish(r, row, float(values[r, rank]), FinishReason.EOS))

        self.history = self.history.filter(parent_rows)
        self.history.append(next_tokens.reshape(-1))
        if self.constraints.active:
            self.constraints = self.constraints.filter(parent_rows)
            self.constraints.consume(next_tokens.reshape(-1), live=(live > -np.inf).reshape(-1))
        self._live_scores = live
        self._generated += 1

        at_limit = self._generated >= self._max_new_tokens
        for r in np.nonzero(at_limit)[0]:
            for slot_index in np.nonzero(live[r] > -np.inf)[0]:
                finished.append(self._finish(r, r * k + slot_index, float(live[r, slot_index]),
                                             FinishReason.LENGTH))

        requests = np.arange(n_requests)
        lp_now = self._length_penalties[requests, self._generated]
        lp_max = self._length_penalties[requests, self._max_new_tokens]
        best_attainable = live.max(axis=1) / np.maximum(lp_now, lp_max)
        enough = self._finished_count >= self._n_best
        done_mask = at_limit | (enough & (self._early_stopping | (self._worst_kept >= best_attainable)))
        done = {self.request_ids[r]: [h for _, _, h in self._kept[r]] for r in np.nonzero(done_mask)[0]}

        keep_rows = self._keep_requests(~done_mask) if done else np.arange(n_requests * k)
        return BeamStep(next_tokens.reshape(-1)[keep_rows], parent_rows[keep_rows], finished, done)

    def _finish(self, request: int, row: int, log_prob: float, reason: FinishReason
                ) -> tuple[Hashable, Hypothesis]:
        """Record a finished hypothesis; `row`'s history holds the prompt then the generated tokens."""
        length = int(self._generated[request])
        start = int(self._prompt_lengths[request])
        tokens = self.history.tokens[row, start : start + length].tolist()
        score = float(log_prob / self._length_penalties[request, length])
        hypothesis = Hypothesis(tokens, score, log_prob, reason)
        kept = self._kept[request]
        kept.append((hypothesis.score, self._finish_order, hypothesis))
        self._finish_order += 1
        kept.sort(key=lambda entry: (-entry[0], entry[1]))
        n_best = int(self._n_best[request])
        del kept[n_best:]
        self._finished_count[request] += 1
        if len(kept) == n_best:
            self._worst_kept[request] = kept[-1][0]
        return self.request_ids[request], hypothesis

    def _keep_requests(self, keep: np.ndarray) -> np.ndarray:
        keep_rows = np.nonzero(np.repeat(keep, self.beam_size))[0]
        self.request_ids = [rid for rid, kept in zip(self.request_ids, keep, strict=True) if kept]
        self.history = self.history.filter(keep_rows)
        self.rows = self.rows.filter(keep_rows)
        self.constraints = self.constraints.filter(keep_rows)
        self._live_scores = self._live_scores[keep]
        self._generated = self._generated[keep]
        self._prompt_lengths = self._prompt_lengths[keep]
        self._max_new_tokens = self._max_new_tokens[keep]
        self._n_best = self._n_best[keep]
        self._early_stopping = self._early_stopping[keep]
        self._length_penalties = self._length_penalties[keep]
        self._finished_count = self._finished_count[keep]
        self._worst_kept = self._worst_kept[keep]
        self._kept = [entries for entries, kept in zip(self._kept, keep, strict=True) if kept]
        return keep_rows


def _extended(column: np.ndarray, values: list) -> np.ndarray:
    return np.concatenate([column, np.array(values, dtype=column.dtype)])
