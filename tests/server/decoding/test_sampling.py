"""Counter-based uniforms and the vectorised inverse-CDF draw with per-row temperature, top-k, top-p."""

import numpy as np

from server.decoding import sampling
from server.decoding.sampling import counter_uniforms, sample_tokens

PROBABILITIES = np.array([0.05, 0.1, 0.15, 0.3, 0.4])


def draw(n, temperature=1.0, top_k=0, top_p=1.0, steps=0, scores=None):
    scores = np.log(PROBABILITIES)[None].repeat(n, 0) if scores is None else scores
    return sample_tokens(scores, np.full(n, temperature), np.full(n, top_k), np.full(n, top_p),
                         np.arange(n, dtype=np.uint64), np.full(n, steps))


def test_uniforms_are_in_the_half_open_unit_interval_and_spread():
    u = counter_uniforms(np.arange(20000, dtype=np.uint64), np.zeros(20000, np.int64))
    assert 0 < u.min() and u.max() <= 1
    assert abs(u.mean() - 0.5) < 0.01
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 1800


def test_uniforms_depend_only_on_seed_and_step():
    seeds = np.array([3, 9, 3, 2**64 - 1], dtype=np.uint64)
    steps = np.array([4, 4, 5, 0])
    together = counter_uniforms(seeds, steps)
    alone = [counter_uniforms(seeds[i:i + 1], steps[i:i + 1])[0] for i in range(4)]
    assert together.tolist() == alone
    assert together[0] != together[2] and together[0] != together[1]


def test_draws_follow_the_distribution():
    n = 20000
    counts = np.bincount(draw(n), minlength=5) / n
    assert np.abs(counts - PROBABILITIES).max() < 4 * np.sqrt(0.25 / n)


def test_top_k_top_p_and_temperature_per_row():
    assert set(draw(2000, top_k=2).tolist()) == {3, 4}
    counts = np.bincount(draw(4000, top_p=0.65), minlength=5)
    assert counts[:3].sum() == 0 and abs(counts[4] / 4000 - 4 / 7) < 0.03
    assert set(draw(2000, top_p=0.3).tolist()) == {4}  # the most probable token always stays
    assert np.mean(draw(2000, temperature=0.1) == 4) > 0.9
    assert np.mean(draw(2000, temperature=5.0) == 0) > 0.12  # flatter than 0.05


def test_top_k_keeps_ties_at_the_boundary():
    scores = np.log(np.array([[0.1, 0.3, 0.3, 0.3]])).repeat(3000, 0)
    assert set(draw(3000, top_k=2, scores=scores).tolist()) == {1, 2, 3}


def test_banned_tokens_are_never_drawn_and_an_all_banned_row_gives_no_nan():
    scores = np.log(PROBABILITIES)[None].repeat(3000, 0)
    scores[:, [0, 4]] = -np.inf
    assert set(draw(3000, scores=scores).tolist()) == {1, 2, 3}
    assert draw(1, scores=np.full((1, 5), -np.inf)).tolist() == [0]


def test_rows_with_different_settings_do_not_disturb_each_other():
    n = 6
    scores = np.log(PROBABILITIES)[None].repeat(n, 0)
    temperature = np.array([1.0, 0.5, 2.0, 1.0, 1.0, 0.8])
    top_k = np.array([0, 3, 0, 2, 0, 4])
    top_p = np.array([1.0, 1.0, 0.8, 1.0, 0.5, 0.9])
    seeds = np.array([11, 22, 33, 44, 55, 66], dtype=np.uint64)
    steps = np.array([0, 1, 2, 3, 4, 5])
    batch = sample_tokens(scores, temperature, top_k, top_p, seeds, steps)
    alone = [sample_tokens(scores[i:i + 1], temperature[i:i + 1], top_k[i:i + 1], top_p[i:i + 1],
                           seeds[i:i + 1], steps[i:i + 1])[0] for i in range(n)]
    assert batch.tolist() == alone


def test_sorting_only_the_head_gives_the_same_tokens_as_a_full_sort(monkeypatch):
    n, vocab = 400, 1000
    rng = np.random.default_rng(5)
    spread = rng.choice([0.5, 3.0, 8.0], n)[:, None]  # flat rows need the full-sort fallback
    scores = rng.normal(0, 1, (n, vocab)) * spread
    scores -= np.log(np.exp(scores).sum(1, keepdims=True))
    args = (scores, rng.choice([0.7, 1.0, 1.5], n), rng.choice([0, 5, 300], n),
            rng.choice([1.0, 0.5, 0.95], n), rng.integers(0, 2**63, n).astype(np.uint64), np.arange(n))
    head = sample_tokens(*args)
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", vocab)
    assert sample_tokens(*args).tolist() == head.tolist()
