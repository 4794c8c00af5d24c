"""The PyTorch reference decoders: beam search against brute-force enumeration, and the decoding rules."""

import math

import pytest
import torch

from training.models.decoding import (
    beam_search,
    counter_uniform,
    gnmt_length_penalty,
    greedy_decode,
    sample_decode,
)

EOS = 2


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # Tensors here are tiny: handing them to a second thread costs more than the work, on shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ToyRecurrentModel:
    """A tiny recurrence with a per-input memory in its state (as seq2seq carries), float64 inside."""

    def __init__(self, vocab, hidden=6, memory=3, seed=0, output_scale=1.5):
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.hidden, self.memory = vocab, hidden, memory
        self.embedding = torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
        self.recurrent = torch.randn(hidden, hidden, generator=g, dtype=torch.float64) * 0.6
        self.context = torch.randn(hidden, hidden, generator=g, dtype=torch.float64) * 0.6
        self.output = torch.randn(hidden, vocab, generator=g, dtype=torch.float64) * output_scale
        self.calls = 0

    def step(self, tokens, state):
        self.calls += 1
        hidden, memory = state
        new = torch.tanh(self.embedding[tokens] + hidden @ self.recurrent + memory.mean(1) @ self.context)
        return torch.log_softmax(new @ self.output, dim=-1).float(), (new, memory)

    def initial(self, batch, seed=1):
        g = torch.Generator().manual_seed(seed)
        return (torch.zeros(batch, self.hidden, dtype=torch.float64),
                torch.randn(batch, self.memory, self.hidden, generator=g, dtype=torch.float64))


def brute_force(model, state, start, *, max_new_tokens, alpha, min_new_tokens=0):
    """Every possible output of one input, scored, best first: (tokens, reason, score)."""
    finished = []
    prefixes, sums = [[]], [0.0]
    tokens = start.clone()
    for length in range(max_new_tokens + 1):
        if length == max_new_tokens:
            lp = gnmt_length_penalty(length, alpha)
            finished += [(p, "length", s / lp) for p, s in zip(prefixes, sums, strict=True)]
            break
        log_probs, state = model.step(tokens, state)
        log_probs = log_probs.double()
        next_prefixes, next_sums, parents, next_tokens = [], [], [], []
        for i, (prefix, total) in enumerate(zip(prefixes, sums, strict=True)):
            if length >= min_new_tokens:
                score = (total + float(log_probs[i, EOS])) / gnmt_length_penalty(length, alpha)
                finished.append((prefix, "eos", score))
            for token in range(model.vocab):
                if token != EOS:
                    next_prefixes.append(prefix + [token])
                    next_sums.append(total + float(log_probs[i, token]))
                    parents.append(i)
                    next_tokens.append(token)
        index = torch.tensor(parents)
        state = tuple(s.index_select(0, index) for s in state)
        tokens = torch.tensor(next_tokens)
        prefixes, sums = next_prefixes, next_sums
    return sorted(finished, key=lambda f: -f[2])


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.2, -0.7])
@pytest.mark.parametrize("min_new_tokens", [0, 2])
def test_exact_beam_equals_brute_force_on_a_tiny_vocabulary(alpha, min_new_tokens):
    vocab, max_new, n_best = 4, 4, 5
    # Wide enough to keep every prefix and every <eos> candidate at rank < K: V * (V - 1)^(max - 1).
    beam_size = vocab * (vocab - 1) ** (max_new - 1)
    model = ToyRecurrentModel(vocab)
    batch = 3
    state = model.initial(batch)
    start = torch.tensor([1, 1, 1])
    got = beam_search(model.step, state, start, eos_id=EOS, max_new_tokens=max_new, beam_size=beam_size,
                      length_penalty=alpha, n_best=n_best, early_stopping=False,
                      min_new_tokens=min_new_tokens)
    for b in range(batch):
        one = tuple(s[b:b + 1] for s in state)
        expected = brute_force(model, one, start[b:b + 1], max_new_tokens=max_new, alpha=alpha,
                               min_new_tokens=min_new_tokens)[:n_best]
        assert [(h.tokens, h.finish_reason) for h in got[b]] == [(t, r) for t, r, _ in expected]
        assert [h.score for h in got[b]] == pytest.approx([s for _, _, s in expected], rel=1e-12)
        for h in got[b]:
            assert h.score == pytest.approx(h.log_prob / gnmt_length_penalty(len(h.tokens), alpha))


# Models chosen so that a bound using lp(max_new_tokens) alone fails the alpha < 0 case and one using
# lp(|Y|) alone fails the peaky alpha > 0 case (checked by hand), while the bound used passes all.
@pytest.mark.parametrize("alpha, seed, output_scale", [
    (0.0, 2, 1.5), (0.6, 2, 1.5), (1.2, 2, 3.0), (1.2, 0, 5.0), (-0.7, 3, 1.5), (-0.7, 2, 1.5)])
def test_exact_stopping_bound_never_loses_the_best(alpha, seed, output_scale):
    # Longer outputs on V=3, so that the bound stops some inputs before max_new_tokens.
    vocab, max_new, n_best = 3, 7, 2
    beam_size = vocab * (vocab - 1) ** (max_new - 1)
    model = ToyRecurrentModel(vocab, seed=seed, output_scale=output_scale)
    state = model.initial(3, seed=seed + 1)
    calls = []
    for b in range(3):
        one, start = tuple(s[b:b + 1] for s in state), torch.tensor([1])
        model.calls = 0
        got = beam_search(model.step, one, start, eos_id=EOS, max_new_tokens=max_new, beam_size=beam_size,
                          length_penalty=alpha, n_best=n_best)[0]
        calls.append(model.calls)
        expected = brute_force(model, one, start, max_new_tokens=max_new, alpha=alpha)[:n_best]
        assert [(h.tokens, h.finish_reason) for h in got] == [(t, r) for t, r, _ in expected]
        assert [h.score for h in got] == pytest.approx([s for _, _, s in expected], rel=1e-12)
    assert min(calls) < max_new  # the bound did stop early


def test_exact_stopping_ends_once_no_live_beam_can_win():
    # (The brute-force test above shows that stopping there never loses the best hypotheses.)
    vocab, max_new = 5, 12
    model = ToyRecurrentModel(vocab, seed=1)
    state, start = model.initial(1, seed=4), torch.tensor([1])
    calls = {}
    for early in (False, True):
        model.calls = 0
        beam_search(model.step, state, start, eos_id=EOS, max_new_tokens=max_new, beam_size=3,
                    length_penalty=1.0, n_best=1, early_stopping=early)
        calls[early] = model.calls
    assert calls[True] < calls[False] < max_new


def test_beam_of_one_with_early_stopping_is_greedy():
    model = ToyRecurrentModel(12, seed=5)
    state, start = model.initial(4, seed=6), torch.tensor([1, 4, 5, 6])
    beams = beam_search(model.step, state, start, eos_id=EOS, max_new_tokens=10, beam_size=1,
                        length_penalty=0.0, early_stopping=True)
    greedy = greedy_decode(model.step, state, start, eos_id=EOS, max_new_tokens=10)
    assert [b[0].tokens for b in beams] == [g.tokens for g in greedy]
    assert [b[0].log_prob for b in beams] == pytest.approx([g.log_prob for g in greedy])


def test_a_batch_decodes_like_its_rows_alone():
    model = ToyRecurrentModel(9, seed=7)
    batch = 4
    state, start = model.initial(batch, seed=8), torch.tensor([1, 3, 4, 5])
    prompts = [[1], [3, 3], [4, 5, 4], [5]]
    options = dict(eos_id=EOS, max_new_tokens=8, min_new_tokens=1, no_repeat_ngram_size=2,
                   repetition_penalty=1.3, prompt_tokens=prompts)

    def alone(decode, **extra):
        rows = []
        for b in range(batch):
            one = dict(options, prompt_tokens=[prompts[b]], **extra)
            if "seed" in extra:
                one["seed"] = [extra["seed"][b]]
            rows.append(decode(model.step, tuple(s[b:b + 1] for s in state), start[b:b + 1], **one)[0])
        return rows

    assert greedy_decode(model.step, state, start, **options) == alone(greedy_decode)
    seeds = [11, 12, 13, 14]
    sampling = dict(seed=seeds, temperature=1.3, top_k=5, top_p=0.9)
    assert sample_decode(model.step, state, start, **options, **sampling) == alone(sample_decode, **sampling)
    beam = dict(beam_size=3, n_best=2, length_penalty=0.8)
    assert beam_search(model.step, state, start, **options, **beam) == alone(beam_search, **beam)


def test_min_new_tokens_and_no_repeat_ngram_hold_in_greedy_output():
    model = ToyRecurrentModel(10, seed=9)
    state, start = model.initial(6, seed=10), torch.tensor([1, 3, 4, 5, 6, 7])
    prompts = [[1], [3, 9, 3], [4], [5, 6], [6], [7, 7, 8]]
    for n in (1, 2, 3):
        out = greedy_decode(model.step, state, start, eos_id=EOS, max_new_tokens=9, min_new_tokens=4,
                            no_repeat_ngram_size=n, prompt_tokens=prompts)
        for prompt, hyp in zip(prompts, out, strict=True):
            assert len(hyp.tokens) >= 4
            history = prompt + hyp.tokens + ([EOS] if hyp.finish_reason == "eos" else [])
            # Only n-grams that end in generated tokens are constrained.
            ngrams = [tuple(history[j:j + n]) for j in range(len(history) - n + 1)]
            generated_ngrams = ngrams[max(0, len(prompt) - n + 1):]
            for i, gram in enumerate(generated_ngrams):
                earlier = ngrams[: max(0, len(prompt) - n + 1) + i]
                assert gram not in earlier


def test_repetition_penalty_multiplies_log_probs_of_seen_tokens():
    log_probs = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))  # token 3 wins unpenalised
    step = lambda tokens, state: (log_probs.expand(len(tokens), -1), state)  # noqa: E731
    state, start = (torch.zeros(1, 1),), torch.tensor([0])
    plain = greedy_decode(step, state, start, eos_id=EOS, max_new_tokens=1, prompt_tokens=[[3]])
    penalised = greedy_decode(step, state, start, eos_id=EOS, max_new_tokens=1, prompt_tokens=[[3]],
                              repetition_penalty=1.5)
    assert plain[0].tokens == [3]
    # log 0.4 * 1.5 = -1.374 < log 0.3 = -1.204, so token 3 loses to <eos> (2), which ends the row.
    assert penalised[0].finish_reason == "eos" and penalised[0].tokens == []
    assert penalised[0].log_prob == pytest.approx(math.log(0.3))


def constant_step(probabilities):
    log_probs = torch.log(torch.tensor([probabilities], dtype=torch.float64)).float()
    return lambda tokens, state: (log_probs.expand(len(tokens), -1), state)


def first_tokens(probabilities, n, **options):
    step = constant_step(probabilities)
    out = sample_decode(step, (torch.zeros(n, 1),), torch.zeros(n, dtype=torch.long), eos_id=EOS,
                        max_new_tokens=1, seed=list(range(n)), **options)
    counts = [0] * len(probabilities)
    for h in out:
        counts[EOS if h.finish_reason == "eos" else h.tokens[0]] += 1
    return counts


def test_seeded_sampling_follows_the_distribution():
    probabilities = [0.05, 0.1, 0.15, 0.3, 0.4]
    n = 4000
    counts = first_tokens(probabilities, n)
    for count, p in zip(counts, probabilities, strict=True):
        assert abs(count / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_top_k_and_top_p_restrict_the_support():
    probabilities = [0.05, 0.1, 0.15, 0.3, 0.4]
    assert first_tokens(probabilities, 600, top_k=2)[:3] == [0, 0, 0]
    # 0.4 + 0.3 = 0.7 >= 0.65: exactly tokens 4 and 3 are kept, renormalised to 4:3.
    counts = first_tokens(probabilities, 1500, top_p=0.65)
    assert counts[:3] == [0, 0, 0] and abs(counts[4] / 1500 - 4 / 7) < 0.05
    # A low temperature sharpens toward the mode.
    assert first_tokens(probabilities, 400, temperature=0.1)[4] > 360  # 0.95 of the mass


def test_counter_uniform_depends_only_on_seed_and_step():
    values = [counter_uniform(seed, step) for seed in range(50) for step in range(50)]
    assert all(0 < v <= 1 for v in values)
    assert len(set(values)) == len(values)
    assert abs(sum(values) / len(values) - 0.5) < 0.02
    assert counter_uniform(7, 3) == counter_uniform(7, 3)


def test_decoders_reject_bad_arguments():
    model = ToyRecurrentModel(5)
    state, start = model.initial(1), torch.tensor([1])
    with pytest.raises(ValueError, match="n_best"):
        beam_search(model.step, state, start, eos_id=EOS, max_new_tokens=3, beam_size=2, n_best=3)
    with pytest.raises(ValueError, match="min_new_tokens"):
        greedy_decode(model.step, state, start, eos_id=EOS, max_new_tokens=3, min_new_tokens=4)
    with pytest.raises(ValueError, match="top_p"):
        sample_decode(model.step, state, start, eos_id=EOS, max_new_tokens=3, seed=1, top_p=0.0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        greedy_decode(model.step, state, start, eos_id=EOS, max_new_tokens=3, repetition_penalty=0.5)


def test_brute_force_helper_counts_every_sequence():
    model = ToyRecurrentModel(3)
    state, start = model.initial(1), torch.tensor([1])
    everything = brute_force(model, state, start, max_new_tokens=3, alpha=0.0)
    # Two non-<eos> tokens: sum of 2^L ending in <eos> for L < 3, plus 2^3 cut at the length limit.
    assert len(everything) == 1 + 2 + 4 + 8
    assert math.fsum(math.exp(s) for _, _, s in everything) == pytest.approx(1.0)
    assert len({tuple(t) + (r,) for t, r, _ in everything}) == len(everything)
    assert all(len(t) == 3 for t, r, _ in everything if r == "length")
    scores = [s for _, _, s in everything]
    assert scores == sorted(scores, reverse=True)
