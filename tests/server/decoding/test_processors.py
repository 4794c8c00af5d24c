"""Each log-prob processor alone, on hand-made histories, with rows of different settings in one call."""

import numpy as np
import pytest

from server.decoding.history import TokenHistory
from server.decoding.params import DecodingParams
from server.decoding.processors import MinNewTokens, NoRepeatNGram, RepetitionPenalty, default_processors
from server.decoding.row_params import RowParams

EOS, VOCAB = 2, 8


def rows_of(*params):
    return RowParams.concatenate([RowParams.from_params(p) for p in params])


def flat_scores(n_rows):
    return np.full((n_rows, VOCAB), np.log(1 / VOCAB))


def test_min_new_tokens_bans_eos_only_while_too_few_were_generated():
    rows = rows_of(DecodingParams(min_new_tokens=3), DecodingParams(min_new_tokens=3), DecodingParams())
    history = TokenHistory.from_prompts([[], [], []], VOCAB)
    scores = MinNewTokens(EOS)(history, flat_scores(3), rows, np.array([2, 3, 0]))
    assert scores[0, EOS] == -np.inf
    assert np.isfinite(scores[1:]).all()
    assert np.isfinite(np.delete(scores[0], EOS)).all()
    with pytest.raises(ValueError):
        MinNewTokens(-1)


def test_no_repeat_ngram_bans_completions_of_seen_ngrams():
    history = TokenHistory.from_prompts([
        [4, 5, 6, 4, 5],  # n=3: suffix (4, 5) was followed by 6 -> ban 6
        [4, 5, 4, 7, 4],  # n=2: suffix (4,) was followed by 5 and 7 -> ban 5, 7
        [3, 1, 3],  # n=1: ban every seen token
        [4, 5, 6, 4, 5],  # off
        [4, 5],  # n=3 but history shorter than n: nothing
        [1, 1, 1],  # n=2: (1,) followed by 1 -> ban 1
    ], VOCAB)
    rows = rows_of(*(DecodingParams(no_repeat_ngram_size=n) for n in (3, 2, 1, 0, 3, 2)))
    scores = NoRepeatNGram()(history, flat_scores(6), rows, np.zeros(6, np.int64))
    banned = [sorted(np.nonzero(np.isneginf(row))[0].tolist()) for row in scores]
    assert banned == [[6], [5, 7], [1, 3], [], [], [1]]


def test_no_repeat_ngram_after_appends_sees_the_new_tokens():
    history = TokenHistory.from_prompts([[0]], VOCAB, min_capacity=1)
    for token in (1, 0):
        history.append(np.array([token]))
    rows = rows_of(DecodingParams(no_repeat_ngram_size=2))
    scores = NoRepeatNGram()(history, flat_scores(1), rows, np.array([2]))
    assert np.nonzero(np.isneginf(scores[0]))[0].tolist() == [1]


def test_repetition_penalty_multiplies_seen_log_probs_per_row():
    history = TokenHistory.from_prompts([[1, 4], [1, 4], []], VOCAB)
    rows = rows_of(DecodingParams(repetition_penalty=2.0), DecodingParams(),
                   DecodingParams(repetition_penalty=3.0))
    before = np.log(np.arange(1, VOCAB + 1) / np.arange(1, VOCAB + 1).sum())[None].repeat(3, 0)
    after = RepetitionPenalty()(history, before.copy(), rows, np.zeros(3, np.int64))
    expected = before.copy()
    expected[0, [1, 4]] *= 2.0
    np.testing.assert_array_equal(after, expected)


def test_default_chain_applies_all_three_in_order():
    history = TokenHistory.from_prompts([[3, 3]], VOCAB)
    rows = rows_of(DecodingParams(min_new_tokens=1, no_repeat_ngram_size=2, repetition_penalty=1.5))
    scores = default_processors(EOS)(history, flat_scores(1), rows, np.array([0]))
    assert scores[0, EOS] == -np.inf and scores[0, 3] == -np.inf
    assert np.isfinite(np.delete(scores[0], [EOS, 3])).all()
