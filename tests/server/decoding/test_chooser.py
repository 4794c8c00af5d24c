"""TokenChooser: greedy and sampling rows in one call, chosen log-probs, top alternatives."""

import numpy as np
import pytest

from server.decoding.chooser import TokenChooser
from server.decoding.history import TokenHistory
from server.decoding.params import DecodingParams
from server.decoding.processors import default_processors
from server.decoding.row_params import RowParams
from server.decoding.sampling import sample_tokens

EOS, VOCAB = 2, 6


def setup(*params):
    rows = RowParams.concatenate([RowParams.from_params(p) for p in params])
    history = TokenHistory.from_prompts([[] for _ in params], VOCAB)
    log_probs = np.log(np.random.default_rng(0).dirichlet(np.ones(VOCAB), len(params))).astype(np.float32)
    return rows, history, log_probs


def test_greedy_and_sampling_rows_share_one_call():
    params = [DecodingParams(), DecodingParams(strategy="sample", seed=4, temperature=0.8, top_k=3),
              DecodingParams(min_new_tokens=5), DecodingParams(strategy="sample", seed=9, top_p=0.7)]
    rows, history, log_probs = setup(*params)
    log_probs[2, EOS] = 0.0  # would win if min_new_tokens did not ban it
    steps = np.array([0, 3, 1, 7])
    choice = TokenChooser(EOS).choose(log_probs, rows, history, steps)
    scores = log_probs.astype(np.float64)
    assert choice.tokens[0] == scores[0].argmax()
    without_eos = scores[2].copy()
    without_eos[EOS] = -np.inf
    assert choice.tokens[2] == without_eos.argmax()
    sampled = [sample_tokens(scores[i:i + 1], rows.temperature[i:i + 1], rows.top_k[i:i + 1],
                             rows.top_p[i:i + 1], rows.seed[i:i + 1], steps[i:i + 1])[0] for i in (1, 3)]
    assert [choice.tokens[1], choice.tokens[3]] == sampled
    expected_log_probs = scores[np.arange(4), choice.tokens]
    np.testing.assert_array_equal(choice.log_probs, expected_log_probs)
    assert choice.alternatives is None
    assert log_probs[2, EOS] == 0.0  # the caller's array is not modified


def test_top_alternatives_are_the_best_processed_log_probs():
    sampling = DecodingParams(strategy="sample", seed=1, top_logprobs=1, min_new_tokens=2)
    rows, history, log_probs = setup(DecodingParams(top_logprobs=3), DecodingParams(), sampling)
    choice = TokenChooser(EOS).choose(log_probs, rows, history, np.zeros(3, np.int64))
    alternatives = choice.alternatives
    assert alternatives.token_ids.shape == (3, 3)
    order = np.argsort(-log_probs[0].astype(np.float64), kind="stable")[:3]
    assert alternatives.token_ids[0].tolist() == order.tolist()
    np.testing.assert_array_equal(alternatives.log_probs[0], log_probs[0, order].astype(np.float64))
    assert alternatives.token_ids[1].tolist() == [-1, -1, -1]
    processed = log_probs[2].astype(np.float64)
    processed[EOS] = -np.inf
    assert alternatives.token_ids[2, 0] == processed.argmax()


def test_beam_rows_are_refused():
    rows, history, log_probs = setup(DecodingParams(strategy="beam"))
    with pytest.raises(ValueError, match="BeamSearch"):
        TokenChooser(EOS).choose(log_probs, rows, history, np.zeros(1, np.int64))


def test_greedy_rows_without_penalties_choose_as_the_processed_float64_path():
    """The argmax shortcut (default chain, greedy rows, only min_new_tokens) equals the full path: ties,
    <eos> as the maximum under and past min_new_tokens, -inf rows."""
    rng = np.random.default_rng(5)
    vocab, count = 12, 64
    params = [DecodingParams(min_new_tokens=int(m)) for m in rng.integers(0, 4, count)]
    rows = RowParams.concatenate([RowParams.from_params(p) for p in params])
    history = TokenHistory.from_prompts([[1]] * count, vocab)
    full_path = TokenChooser(EOS, processors=default_processors(EOS))  # an explicit chain: no shortcut
    shortcut = TokenChooser(EOS)
    assert shortcut._argmax_suffices(rows) and not full_path._argmax_suffices(rows)
    for _ in range(30):
        log_probs = np.round(rng.normal(size=(count, vocab)), 1).astype(np.float32)  # many ties
        log_probs[rng.random(count) < 0.4, EOS] = 5.0  # <eos> is the maximum in many rows
        log_probs[rng.random((count, vocab)) < 0.1] = -np.inf
        log_probs[0] = -np.inf
        steps = rng.integers(0, 5, count)
        expected = full_path.choose(log_probs, rows, history, steps)
        got = shortcut.choose(log_probs, rows, history, steps)
        np.testing.assert_array_equal(got.tokens, expected.tokens)
        np.testing.assert_array_equal(got.log_probs, expected.log_probs)
        assert got.log_probs.dtype == expected.log_probs.dtype == np.float64
    penalised = RowParams.concatenate([rows, RowParams.from_params(DecodingParams(repetition_penalty=1.2))])
    assert not shortcut._argmax_suffices(penalised)
