"""server/decoding/history.py: TokenHistory, the per-row tokens (and seen-token sets) a batch carries
through append, filter and concatenate."""

import numpy as np
import pytest

from server.decoding.history import TokenHistory


def row(history, index: int):
    """The tokens of one row of a TokenHistory (up to its length)."""
    return history.tokens[index, : history.lengths[index]]


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
