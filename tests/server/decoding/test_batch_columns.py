"""RowParams and TokenHistory: the per-row columns a batch carries through filter and concatenate."""

import numpy as np
import pytest

from server.decoding.history import TokenHistory
from server.decoding.params import DecodingParams
from server.decoding.row_params import BEAM, GREEDY, SAMPLE, RowParams


def row(history, index: int):
    """The tokens of one row of a TokenHistory (up to its length)."""
    return history.tokens[index, : history.lengths[index]]


def test_row_params_from_params_fills_every_column():
    rows = RowParams.from_params(DecodingParams(strategy="sample", seed=2**64 - 1, top_k=4, top_p=0.5,
                                                temperature=0.7, repetition_penalty=1.2, min_new_tokens=3,
                                                no_repeat_ngram_size=2, top_logprobs=5), n_rows=3)
    assert len(rows) == 3
    assert rows.strategy.tolist() == [SAMPLE] * 3
    assert rows.seed.dtype == np.uint64 and int(rows.seed[0]) == 2**64 - 1
    assert rows.top_k.tolist() == [4] * 3 and rows.top_p.tolist() == [0.5] * 3
    assert rows.temperature[0] == 0.7 and rows.repetition_penalty[0] == 1.2
    assert rows.min_new_tokens[0] == 3 and rows.no_repeat_ngram_size[0] == 2 and rows.top_logprobs[0] == 5
    assert rows.max_new_tokens[0] == 64


def test_row_params_draw_a_seed_only_for_unseeded_sampling():
    assert RowParams.from_params(DecodingParams()).seed.tolist() == [0]
    drawn = {int(RowParams.from_params(DecodingParams(strategy="sample")).seed[0]) for _ in range(5)}
    assert len(drawn) == 5


def test_row_params_filter_and_concatenate():
    greedy = RowParams.from_params(DecodingParams(max_new_tokens=5), 2)
    beam = RowParams.from_params(DecodingParams(strategy="beam", beam_size=3), 3)
    both = RowParams.concatenate([RowParams.empty(), greedy, beam])
    assert both.strategy.tolist() == [GREEDY, GREEDY, BEAM, BEAM, BEAM]
    picked = both.filter(np.array([4, 0, 0]))
    assert picked.strategy.tolist() == [BEAM, GREEDY, GREEDY]
    assert picked.max_new_tokens.tolist() == [64, 5, 5]
    assert len(both.filter(np.zeros(5, bool))) == 0
    assert len(RowParams.concatenate([])) == 0


def test_history_from_prompts_append_and_growth():
    history = TokenHistory.from_prompts([[5, 6], [], [7]], vocab_size=10, min_capacity=2)
    assert history.lengths.tolist() == [2, 0, 1]
    assert history.seen[0, [5, 6]].all() and not history.seen[1].any()
    capacity = history.tokens.shape[1]
    for step in range(capacity + 1):
        history.append(np.array([1, 2, 3]) + step % 2)
    assert history.tokens.shape[1] > capacity  # doubled
    assert row(history, 0).tolist() == [5, 6] + [1 + s % 2 for s in range(capacity + 1)]
    assert row(history, 1).tolist() == [2 + s % 2 for s in range(capacity + 1)]
    assert history.seen[1, [2, 3]].all() and not history.seen[1, 1]


def test_history_filter_repeats_rows_independently():
    history = TokenHistory.from_prompts([[1], [2, 3]], vocab_size=5)
    forked = history.filter(np.array([1, 1, 0]))
    forked.append(np.array([4, 0, 4]))
    assert [row(forked, i).tolist() for i in range(3)] == [[2, 3, 4], [2, 3, 0], [1, 4]]
    assert row(history, 1).tolist() == [2, 3]  # the original is untouched
    assert forked.seen[0, 4] and not forked.seen[1, 4]


def test_history_concatenate_pads_to_the_widest():
    short = TokenHistory.from_prompts([[1]], vocab_size=6, min_capacity=1)
    long = TokenHistory.from_prompts([[2] * 40], vocab_size=6)
    joined = TokenHistory.concatenate([short, TokenHistory.empty(6), long])
    assert joined.lengths.tolist() == [1, 40]
    assert row(joined, 0).tolist() == [1] and row(joined, 1).tolist() == [2] * 40
    assert joined.seen[:, 2].tolist() == [False, True]
    with pytest.raises(ValueError):
        TokenHistory.concatenate([short, TokenHistory.empty(7)])
