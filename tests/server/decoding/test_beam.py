"""BeamSearch bookkeeping: a hand-checked run, dead beams, leaving and joining between steps."""

import math

import numpy as np
import pytest

from server.decoding.beam import BeamSearch
from server.decoding.hypothesis import FinishReason
from server.decoding.params import DecodingParams

EOS = 2


def beam_params(**fields):
    return DecodingParams(strategy="beam", **{"beam_size": 2, "length_penalty": 0.0, **fields})


def test_hand_checked_steps():
    beams = BeamSearch(beam_size=2, vocab_size=4, eos_id=EOS)
    beams.join(["r"], [beam_params(max_new_tokens=5)])
    dead = [0.25] * 4  # the dead beam's row: whatever the model says, it stays -inf

    # Step 0: candidates 3 > <eos> > 1 > 0 from the single live beam; <eos> has rank 1 < K: it finishes.
    step = beams.step(np.log([[0.1, 0.2, 0.3, 0.4], dead]))
    assert step.parent_rows.tolist() == [0, 0] and step.next_tokens.tolist() == [3, 1]
    assert [(rid, h.tokens, h.finish_reason) for rid, h in step.finished] == [("r", [], FinishReason.EOS)]
    assert step.finished[0][1].score == pytest.approx(math.log(0.3))
    assert step.done == {}

    # Step 1: beam 0 -> 3 is best; beam 1's four tokens tie, so lower flat index wins; its <eos> has
    # rank 3 >= K and is dropped.
    step = beams.step(np.log([[0.05, 0.05, 0.1, 0.8], [0.25, 0.25, 0.25, 0.25]]))
    assert step.parent_rows.tolist() == [0, 1] and step.next_tokens.tolist() == [3, 0]
    assert step.finished == [] and step.done == {}

    # Step 2: [3, 3] + <eos> beats the empty hypothesis and no live beam can beat it any more.
    step = beams.step(np.log([[0.01, 0.01, 0.97, 0.01], [0.25, 0.25, 0.25, 0.25]]))
    best = math.log(0.4) + math.log(0.8) + math.log(0.97)
    assert list(step.done) == ["r"]
    assert [(h.tokens, h.finish_reason) for h in step.done["r"]] == [([3, 3], FinishReason.EOS)]
    assert step.done["r"][0].score == pytest.approx(best)
    assert len(step.next_tokens) == len(step.parent_rows) == 0 and len(beams) == 0


def test_dead_beams_when_the_vocabulary_is_smaller_than_the_beam():
    beams = BeamSearch(beam_size=4, vocab_size=3, eos_id=EOS)
    beams.join([0], [beam_params(beam_size=4, max_new_tokens=3)])
    step = beams.step(np.log(np.array([[0.4, 0.4, 0.2]] * 4)))
    # Two non-<eos> continuations exist: two live beams, two dead slots fed <eos>.
    assert step.next_tokens.tolist() == [0, 1, EOS, EOS]
    assert beams._live_scores[0, 2:].tolist() == [-np.inf, -np.inf]


def bigram_table(vocab=7, seed=0):
    return np.log(np.random.default_rng(seed).dirichlet(np.full(vocab, 0.5), vocab)).astype(np.float32)


def run(beams, table, schedule, cancel_at=None):
    """Feeds a bigram model (the token is the state); `schedule` maps step -> [(id, params, start)]."""
    tokens, results, step = np.zeros(0, np.int64), {}, 0
    while step in schedule or len(beams):
        for rid, params, start in schedule.get(step, []):
            beams.join([rid], [params], [[start]])
            tokens = np.concatenate([tokens, np.full(beams.beam_size, start)])
        if cancel_at and step == cancel_at[0]:
            tokens = tokens[beams.leave([cancel_at[1]])]
        result = beams.step(table[tokens])
        tokens = result.next_tokens
        results.update({rid: [(h.tokens, h.score) for h in hyps] for rid, hyps in result.done.items()})
        step += 1
    return results


def test_leaving_requests_do_not_change_the_others():
    table = bigram_table()
    a = beam_params(beam_size=3, n_best=2, max_new_tokens=9, length_penalty=0.7)
    b = beam_params(beam_size=3, max_new_tokens=9, no_repeat_ngram_size=2)
    c = beam_params(beam_size=3, n_best=3, max_new_tokens=6, repetition_penalty=1.4)
    schedule = {0: [("a", a, 1), ("b", b, 4)], 2: [("c", c, 5)]}
    everyone = run(BeamSearch(3, 7, EOS), table, schedule)
    cancelled = run(BeamSearch(3, 7, EOS), table, schedule, cancel_at=(3, "b"))
    assert set(everyone) == {"a", "b", "c"} and set(cancelled) == {"a", "c"}
    assert cancelled["a"] == everyone["a"] and cancelled["c"] == everyone["c"]
    assert len(everyone["c"]) == 3


def test_leave_returns_the_rows_to_keep():
    beams = BeamSearch(3, 5, EOS)
    beams.join(["x", "y", "z"], [beam_params(beam_size=3)] * 3)
    assert beams.leave(["y"]).tolist() == [0, 1, 2, 6, 7, 8]
    assert beams.request_ids == ["x", "z"] and beams.num_rows == 6


def test_hypotheses_finished_so_far_and_argument_checks():
    beams = BeamSearch(2, 4, EOS)
    beams.join(["r"], [beam_params(max_new_tokens=4, n_best=2)])
    step = beams.step(np.log([[0.1, 0.2, 0.3, 0.4], [0.25] * 4]))
    # The first step finishes the empty hypothesis, the only one so far; "r" wants two and goes on.
    assert [(rid, h.tokens) for rid, h in step.finished] == [("r", [])] and step.done == {}
    with pytest.raises(ValueError, match="log_probs"):
        beams.step(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="beam_size=2"):
        beams.join(["s"], [beam_params(beam_size=3)])
    with pytest.raises(ValueError, match="beam_size=2"):
        beams.join(["s"], [DecodingParams(beam_size=2)])
