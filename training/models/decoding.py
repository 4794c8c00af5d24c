"""Reference decoders in plain PyTorch (greedy, seeded sampling, beam search) over any step function.

They are written for clarity, one row at a time where that reads better, and are the yardstick the
exporters' parity checks and the server's decoders (`server/decoding/`, numpy) are compared against,
token for token. The server implements exactly the semantics below.

Step function: `step_fn(tokens[B] int64, state) -> (log_probs[B, V], state)`, every state tensor batch
first, so beams expand with `repeat_interleave(K, 0)` and reorder with `index_select(0, parents)`.
Seq2seq models put their constant memory and mask in the state tuple, so they follow the beams too.
Decoding starts by feeding `start_tokens` (<bos> for seq2seq; for an LM the last prompt token, the rest
of the prompt having been fed already).

Semantics:
- Length |Y| counts generated tokens, excluding the prompt and <eos>. `max_new_tokens` bounds |Y|;
  a sequence that reaches it finishes with reason "length", one that chooses <eos> with "eos".
- Scores are float64. log_prob = sum of the chosen tokens' *processed* log-probs (below), <eos>'s
  included when chosen. Greedy and sampling: score = log_prob. Beam: score = log_prob / lp(|Y|) with the
  GNMT penalty lp(L) = ((5 + L) / 6) ** alpha.
- History of a row = `prompt_tokens` (optional; an LM passes its whole prompt) + generated tokens.
- Processors, applied in this order to the model's log-probs, never renormalised:
  1. min_new_tokens: <eos> -> -inf while fewer than min_new_tokens tokens were generated;
  2. no_repeat_ngram_size n: with history h of length L, ban h[j + n - 1] for every j <= L - n with
     h[j : j + n - 1] == h[L - n + 1 : L] (n = 1 bans every token of the history);
  3. repetition_penalty p >= 1: the log-prob of every token in the history is multiplied by p (CTRL /
     HF style; log-probs are <= 0, so this always lowers them).
- Greedy: argmax, first index on ties.
- Sampling (temperature, top_k, top_p, seed): y = x / temperature, e = exp(y - max y); top-k keeps
  e >= the k-th largest (ties kept; 0 or >= V = off); top-p (1.0 = off) orders the kept e by
  (e descending, id ascending) and keeps each while the mass before it (summed in that order) is
  < p * total, total being the kept e summed in token-id order (at least one token stays); then
  c = cumsum of the kept e in token-id order and token = #{v : c[v] < u * c[-1]}. Sums are sequential
  (cumsum), never pairwise, so numpy and torch get the same bits.
  u = counter_uniform(seed, step) in (0, 1] depends only on (seed, step = tokens generated so far), so a
  row's draws never depend on the rest of the batch.
- Beam (beam_size K, length_penalty alpha, n_best <= K, early_stopping): each input starts with one live
  beam (score 0) and K - 1 dead ones (-inf), so there are no duplicates. Each step, candidates are
  live_score[k] + processed_logp[k, v] over K*V; the top 2K are taken by a stable descending sort (ties:
  lower flat index k * V + v first). In that order an <eos> candidate of rank < K finishes a hypothesis
  (length = tokens before <eos>), an <eos> of rank >= K is dropped (as in HF), any other candidate fills
  the next of the K live beams; -inf candidates are skipped and unfilled beams stay dead. When |Y| reaches
  max_new_tokens, every live beam finishes with reason "length". An input is done when it has >= n_best
  finished hypotheses and either early_stopping=True, or no live beam can still beat the n_best-th best
  finished score, i.e. worst_kept >= best_live / max(lp(|Y|), lp(max_new_tokens)).
  Why that bound holds for every alpha: a live beam with summed log-prob s <= 0 and length |Y| ends with
  length L' in [|Y|, max_new_tokens] (an immediate <eos> keeps |Y|) and s' <= s, so its score is at most
  s / lp(L'); for s <= 0 that is largest where lp is largest, and lp is monotone in L', hence
  lp(max_new_tokens) for alpha > 0, lp(|Y|) for alpha < 0, and 1 for alpha = 0.
  The n-best are the highest scores, ties in order of finishing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

State = tuple[torch.Tensor, ...]
StepFn = Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # generated ids, without the prompt and without <eos>
    score: float  # beam: log_prob / lp(len(tokens)); greedy and sampling: log_prob
    log_prob: float  # sum of the chosen tokens' processed log-probs, <eos> included when chosen
    finish_reason: str  # "eos" | "length"


def gnmt_length_penalty(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


# The counter-based generator of server/decoding/sampling.py, written again in plain Python because
# training never imports server; tests check that both give the same bits.
_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def counter_uniform(seed: int, step: int) -> float:
    """Uniform in (0, 1] from (seed, step) alone: splitmix64 output step + 1 of the stream keyed by seed."""
    key = _mix64((seed + _GOLDEN_GAMMA) & _MASK64)
    bits = _mix64((key + (step + 1) * _GOLDEN_GAMMA) & _MASK64)
    return ((bits >> 11) + 1) * 2.0**-53


@dataclass(frozen=True)
class _Processing:
    """The log-prob processors of the module docstring, applied in that order to float64 copies."""

    eos_id: int
    min_new_tokens: int
    no_repeat_ngram_size: int
    repetition_penalty: float

    def __post_init__(self):
        if self.min_new_tokens < 0 or self.no_repeat_ngram_size < 0:
            raise ValueError("min_new_tokens and no_repeat_ngram_size must be >= 0")
        if not self.repetition_penalty >= 1.0:
            raise ValueError(f"repetition_penalty must be >= 1, got {self.repetition_penalty}")

    def __call__(self, log_probs: torch.Tensor, histories: list[list[int]], generated: int) -> torch.Tensor:
        scores = log_probs.double().clone()
        if generated < self.min_new_tokens:
            scores[:, self.eos_id] = -math.inf
        if self.no_repeat_ngram_size > 0:
            for row, history in enumerate(histories):
                banned = _banned_ngram_tokens(history, self.no_repeat_ngram_size)
                if banned:
                    scores[row, sorted(banned)] = -math.inf
        if self.repetition_penalty != 1.0:
            for row, history in enumerate(histories):
                if history:
                    scores[row, sorted(set(history))] *= self.repetition_penalty
        return scores


def _banned_ngram_tokens(history: list[int], n: int) -> set[int]:
    suffix = history[len(history) - n + 1:] if n > 1 else []
    return {history[j + n - 1] for j in range(len(history) - n + 1) if history[j:j + n - 1] == suffix}


def _prompts(prompt_tokens: Sequence[Sequence[int]] | None, batch: int) -> list[list[int]]:
    if prompt_tokens is None:
        return [[] for _ in range(batch)]
    if len(prompt_tokens) != batch:
        raise ValueError(f"prompt_tokens must have one entry per row ({batch}), got {len(prompt_tokens)}")
    return [list(p) for p in prompt_tokens]


def _check_lengths(max_new_tokens: int, min_new_tokens: int) -> None:
    if max_new_tokens < 1 or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens, got "
                         f"{max_new_tokens} and {min_new_tokens}")


def _sample_row(scores: torch.Tensor, temperature: float, top_k: int, top_p: float, uniform: float) -> int:
    scaled = scores / temperature
    peak = scaled.max()
    weights = torch.exp(scaled - (peak if torch.isfinite(peak) else 0.0))
    vocab = weights.numel()
    if 0 < top_k < vocab:
        kth = -torch.sort(-weights, stable=True).values[top_k - 1]
        weights = torch.where(weights >= kth, weights, torch.zeros_like(weights))
    if top_p < 1.0:
        order = torch.sort(-weights, stable=True).indices
        ranked = weights[order]
        cumulative = torch.cumsum(ranked, 0)
        mass_before = torch.cat([cumulative.new_zeros(1), cumulative[:-1]])
        total = torch.cumsum(weights, 0)[-1]  # summed in token-id order: the server's exact arithmetic
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[order] = mass_before < top_p * total
        weights = torch.where(keep, weights, torch.zeros_like(weights))
    cumulative = torch.cumsum(weights, 0)
    return int((cumulative < uniform * cumulative[-1]).sum())


def _decode_token_by_token(step_fn: StepFn, state: State, start_tokens: torch.Tensor,
                           choose: Callable[[torch.Tensor, int], list[int]], processing: _Processing,
                           max_new_tokens: int, prompt_tokens) -> list[Hypothesis]:
    batch = start_tokens.shape[0]
    histories = _prompts(prompt_tokens, batch)
    generated: list[list[int]] = [[] for _ in range(batch)]
    log_probs_sum = [0.0] * batch
    reasons: list[str | None] = [None] * batch
    tokens = start_tokens
    for step in range(max_new_tokens):
        log_probs, state = step_fn(tokens, state)
        scores = processing(log_probs, histories, step)
        chosen = choose(scores, step)
        for row, token in enumerate(chosen):
            histories[row].append(token)
            if reasons[row] is not None:
                continue  # finished rows keep stepping with the batch; their output is ignored
            log_probs_sum[row] += float(scores[row, token])
            if token == processing.eos_id:
                reasons[row] = "eos"
            else:
                generated[row].append(token)
        if all(r is not None for r in reasons):
            break
        tokens = torch.tensor(chosen, dtype=torch.long, device=start_tokens.device)
    return [Hypothesis(generated[r], log_probs_sum[r], log_probs_sum[r], reasons[r] or "length")
            for r in range(batch)]


@torch.no_grad()
def greedy_decode(step_fn: StepFn, state: State, start_tokens: torch.Tensor, *, eos_id: int,
                  max_new_tokens: int, min_new_tokens: int = 0, no_repeat_ngram_size: int = 0,
                  repetition_penalty: float = 1.0,
                  prompt_tokens: Sequence[Sequence[int]] | None = None) -> list[Hypothesis]:
    """One hypothesis per row: the most probable token at every step."""
    _check_lengths(max_new_tokens, min_new_tokens)
    processing = _Processing(eos_id, min_new_tokens, no_repeat_ngram_size, repetition_penalty)
    return _decode_token_by_token(step_fn, state, start_tokens, lambda scores, _: scores.argmax(1).tolist(),
                                  processing, max_new_tokens, prompt_tokens)


@torch.no_grad()
def sample_decode(step_fn: StepFn, state: State, start_tokens: torch.Tensor, *, eos_id: int,
                  max_new_tokens: int, seed: int | Sequence[int], temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, min_new_tokens: int = 0, no_repeat_ngram_size: int = 0,
                  repetition_penalty: float = 1.0,
                  prompt_tokens: Sequence[Sequence[int]] | None = None) -> list[Hypothesis]:
    """One sampled hypothesis per row; `seed` is one seed for every row or one per row."""
    _check_lengths(max_new_tokens, min_new_tokens)
    if not (temperature > 0 and top_k >= 0 and 0 < top_p <= 1):
        raise ValueError(f"need temperature > 0, top_k >= 0 and 0 < top_p <= 1, got {temperature}, {top_k}, "
                         f"{top_p}")
    batch = start_tokens.shape[0]
    seeds = [seed] * batch if isinstance(seed, int) else list(seed)
    if len(seeds) != batch:
        raise ValueError(f"seed must be one int or one per row ({batch}), got {len(seeds)}")
    processing = _Processing(eos_id, min_new_tokens, no_repeat_ngram_size, repetition_penalty)

    def choose(scores: torch.Tensor, step: int) -> list[int]:
        return [_sample_row(scores[row], temperature, top_k, top_p, counter_uniform(seeds[row], step))
                for row in range(batch)]

    return _decode_token_by_token(step_fn, state, start_tokens, choose, processing, max_new_tokens,
                                  prompt_tokens)


@torch.no_grad()
def beam_search(step_fn: StepFn, state: State, start_tokens: torch.Tensor, *, eos_id: int,
                max_new_tokens: int, beam_size: int, length_penalty: float = 1.0, n_best: int = 1,
                early_stopping: bool = False, min_new_tokens: int = 0, no_repeat_ngram_size: int = 0,
                repetition_penalty: float = 1.0,
                prompt_tokens: Sequence[Sequence[int]] | None = None) -> list[list[Hypothesis]]:
    """The n_best hypotheses of every input, best first (see the module docstring for the rules)."""
    _check_lengths(max_new_tokens, min_new_tokens)
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"need 1 <= n_best <= beam_size, got n_best={n_best}, beam_size={beam_size}")
    processing = _Processing(eos_id, min_new_tokens, no_repeat_ngram_size, repetition_penalty)
    k = beam_size
    batch = start_tokens.shape[0]
    prompts = _prompts(prompt_tokens, batch)

    def lp(length: int) -> float:
        return gnmt_length_penalty(length, length_penalty)

    state = tuple(s.repeat_interleave(k, 0) for s in state)
    tokens = start_tokens.repeat_interleave(k)
    histories = [list(prompts[b]) for b in range(batch) for _ in range(k)]
    live = [[0.0] + [-math.inf] * (k - 1) for _ in range(batch)]
    finished: list[list[tuple[float, int, Hypothesis]]] = [[] for _ in range(batch)]
    finish_order = itertools.count()
    done = [False] * batch

    def finish(b: int, row: int, log_prob: float, reason: str, length: int) -> None:
        hypothesis = Hypothesis(histories[row][len(prompts[b]):], log_prob / lp(length), log_prob, reason)
        finished[b].append((hypothesis.score, next(finish_order), hypothesis))

    for step in range(max_new_tokens):
        log_probs, state = step_fn(tokens, state)
        vocab = log_probs.shape[1]
        scores = processing(log_probs, histories, step)
        live_scores = torch.tensor(live, dtype=torch.float64).reshape(-1, 1)
        candidates = (live_scores + scores).reshape(batch, k * vocab)
        negated, flat = torch.sort(-candidates, dim=1, stable=True)
        top_values, top_flat = (-negated[:, : 2 * k]).tolist(), flat[:, : 2 * k].tolist()

        parents, next_tokens, next_live = [], [], []
        for b in range(batch):
            picks: list[tuple[int, int, float]] = []
            for rank, (value, index) in enumerate(zip(top_values[b], top_flat[b], strict=True)):
                if done[b] or value == -math.inf or len(picks) == k:
                    break
                beam, token = divmod(index, vocab)
                if token != eos_id:
                    picks.append((b * k + beam, token, value))
                elif rank < k:
                    finish(b, b * k + beam, value, "eos", step)
            picks += [(b * k, eos_id, -math.inf)] * (k - len(picks))  # dead beams
            parents += [row for row, _, _ in picks]
            next_tokens += [token for _, token, _ in picks]
            next_live.append([value for _, _, value in picks])

        index = torch.tensor(parents, dtype=torch.long, device=start_tokens.device)
        state = tuple(s.index_select(0, index) for s in state)
        histories = [histories[row] + [token] for row, token in zip(parents, next_tokens, strict=True)]
        tokens = torch.tensor(next_tokens, dtype=torch.long, device=start_tokens.device)
        live = next_live
        length = step + 1

        for b in range(batch):
            if done[b]:
                continue
            if length == max_new_tokens:
                for slot, value in enumerate(live[b]):
                    if value > -math.inf:
                        finish(b, b * k + slot, value, "length", length)
                done[b] = True
            elif len(finished[b]) >= n_best:
                worst_kept = sorted((s for s, _, _ in finished[b]), reverse=True)[n_best - 1]
                best_attainable = max(live[b]) / max(lp(length), lp(max_new_tokens))
                done[b] = early_stopping or worst_kept >= best_attainable
        if all(done):
            break

    return [[h for _, _, h in sorted(entries, key=lambda e: (-e[0], e[1]))[:n_best]] for entries in finished]
