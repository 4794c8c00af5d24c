"""Seeded sampling that does not depend on the batch: a counter-based generator plus an inverse CDF.

A row's draw at step t depends only on (seed, t) and its own log-probs, so a seeded request returns the
same tokens alone or beside any other rows. The PyTorch reference (`training/models/decoding.py`)
implements the same arithmetic; the tests check both bit for bit.

Uniforms, for seed s and step t (tokens generated so far in this request), all mod 2**64:
    key  = mix64(s + GAMMA)                 # splitmix64's first output for seed s
    bits = mix64(key + (t + 1) * GAMMA)     # the (t + 1)-th splitmix64 output of stream `key`
    u    = ((bits >> 11) + 1) * 2**-53      # in (0, 1]: never 0, so the draw never lands on a banned token

Draw, per row, from float64 processed log-probs x[V]:
    y = x / temperature;  e = exp(y - max(y))                   (all -inf -> e = 0, token 0)
    top-k (0 < k < V):   keep e >= the k-th largest e            (ties at the boundary are kept)
    top-p (p < 1):       order the kept e by (e descending, id ascending); keep position i while the
                         mass before it (cumsum in that order) is < p * total, where total is the
                         kept e summed in token-id order (cumsum[-1]); the first always stays
    c = cumsum of the kept e in token-id order (0 elsewhere);  token = #{v : c[v] < u * c[V - 1]}
"""

from __future__ import annotations

import numpy as np

from server.decoding.selection import stable_top_k

NUCLEUS_CANDIDATES = 256  # tokens sorted per sampling row; rows whose nucleus is wider sort everything
GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser; uint64 array arithmetic wraps mod 2**64 silently, as intended."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def counter_uniforms(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """float64 uniforms in (0, 1], one per row, from (seed, step) alone."""
    seeds = np.atleast_1d(np.asarray(seeds, dtype=np.uint64))
    steps = np.atleast_1d(np.asarray(steps, dtype=np.uint64))
    key = _mix64(seeds + GOLDEN_GAMMA)
    bits = _mix64(key + (steps + np.uint64(1)) * GOLDEN_GAMMA)
    return ((bits >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * 2.0**-53


def sample_tokens(scores: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
                  seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """One token per row of float64 processed log-probs [N, V], with per-row settings (see module doc)."""
    n_rows, vocab = scores.shape
    scaled = scores / temperature[:, None]
    peak = scaled.max(axis=1)
    peak = np.where(np.isfinite(peak), peak, 0.0)  # an all-banned row gives e = 0 instead of NaN
    weights = np.exp(scaled - peak[:, None])

    uses_top_k = (top_k > 0) & (top_k < vocab)
    uses_top_p = top_p < 1.0
    filtered = np.nonzero(uses_top_k | uses_top_p)[0]
    if filtered.size:
        weights[filtered] = _filter_top_k_top_p(weights[filtered], top_k[filtered], uses_top_k[filtered],
                                                top_p[filtered], uses_top_p[filtered])

    cumulative = np.cumsum(weights, axis=1)
    targets = counter_uniforms(seeds, steps) * cumulative[:, -1]
    return (cumulative < targets[:, None]).sum(axis=1).astype(np.int64)


def _filter_top_k_top_p(weights: np.ndarray, top_k: np.ndarray, uses_top_k: np.ndarray, top_p: np.ndarray,
                        uses_top_p: np.ndarray) -> np.ndarray:
    # Only the head of each row's sorted order matters, so sort the best `width` tokens, not the vocabulary
    # (a full sort of 32k entries per row per step would cost more than the model).
    n_rows, vocab = weights.shape
    width = min(vocab, max(NUCLEUS_CANDIDATES, int(top_k[uses_top_k].max(initial=0))))
    order, ranked = stable_top_k(weights, width)  # exactly the first `width` places of the full order
    kth = ranked[np.arange(n_rows), np.clip(top_k - 1, 0, width - 1)]
    threshold = np.where(uses_top_k, kth, 0.0)[:, None]
    weights = np.where(weights >= threshold, weights, 0.0)  # top-k, ties kept wherever they sit

    nucleus_rows = np.nonzero(uses_top_p)[0]
    if nucleus_rows.size == 0:
        return weights
    # Removed tokens were the smallest, so zeroing them leaves `ranked` the head of the re-sorted order.
    ranked = np.where(ranked >= threshold, ranked, 0.0)[nucleus_rows]
    nucleus = weights[nucleus_rows]
    p = top_p[nucleus_rows]
    total = np.cumsum(nucleus, axis=1)[:, -1]  # summed in token-id order, as the reference does
    keep, within_head = _nucleus_mask(order[nucleus_rows], ranked, p, total, vocab)
    wider = np.nonzero(~within_head)[0]
    if wider.size:  # flat distributions whose nucleus outgrows the head: sort those rows fully
        full_order = np.argsort(-nucleus[wider], axis=1, kind="stable")
        full_ranked = np.take_along_axis(nucleus[wider], full_order, axis=1)
        keep[wider], _ = _nucleus_mask(full_order, full_ranked, p[wider], total[wider], vocab)
    weights[nucleus_rows] = np.where(keep, nucleus, 0.0)
    return weights


def _nucleus_mask(order: np.ndarray, ranked: np.ndarray, top_p: np.ndarray, total: np.ndarray,
                  vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep mask [S, V] of the sorted places (`order`, values `ranked`) whose mass before is < p * total,
    and per row whether that decision is complete: the head reached p * total (every later place has at
    least that much mass before it) or covers the whole vocabulary."""
    cumulative = np.cumsum(ranked, axis=1)
    mass_before = np.concatenate([np.zeros((len(ranked), 1)), cumulative[:, :-1]], axis=1)
    target = (top_p * total)[:, None]
    keep = np.zeros((len(order), vocab), dtype=bool)
    np.put_along_axis(keep, order, (ranked > 0) & (mass_before < target), axis=1)
    return keep, (cumulative[:, -1] >= target[:, 0]) | (order.shape[1] == vocab)
