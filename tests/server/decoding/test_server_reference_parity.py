"""The numpy server decoders equal the PyTorch reference decoders token for token.

One tiny recurrent model is written twice, in numpy and in torch, with the same weights. It computes in
float64 and returns float32 log-probs, as an ONNX graph would, so both sides see identical inputs. Its
state holds a per-input memory and mask (as seq2seq does), so a wrong beam reorder changes the output.
"""

import numpy as np
import pytest
import torch

from server.decoding import (
    BeamSearch,
    DecodingParams,
    RowParams,
    TokenChooser,
    TokenHistory,
    counter_uniforms,
    sampling,
)
from training.models.decoding import beam_search, counter_uniform, greedy_decode, sample_decode

VOCAB, HIDDEN, MEMORY = 12, 8, 5
EOS = 2


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # Tensors here are tiny: handing them to a second thread costs more than the work, on shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_weights(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "embedding": rng.normal(0, 1.0, (VOCAB, HIDDEN)),
        "recurrent": rng.normal(0, 0.6, (HIDDEN, HIDDEN)),
        "context": rng.normal(0, 0.6, (HIDDEN, HIDDEN)),
        "output": rng.normal(0, 1.2, (HIDDEN, VOCAB)),
        "bias": rng.normal(0, 0.5, VOCAB),
    }


WEIGHTS = make_weights()
TORCH_WEIGHTS = {name: torch.from_numpy(w) for name, w in WEIGHTS.items()}


def numpy_step(tokens, state):
    hidden, memory, mask = state
    w = WEIGHTS
    context = (memory * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    new = np.tanh(w["embedding"][tokens] + hidden[:, 0] @ w["recurrent"] + context @ w["context"])
    logits = new @ w["output"] + w["bias"]
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return log_probs.astype(np.float32), (new[:, None], memory, mask)


def torch_step(tokens, state):
    hidden, memory, mask = state
    w = TORCH_WEIGHTS
    context = (memory * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    new = torch.tanh(w["embedding"][tokens] + hidden[:, 0] @ w["recurrent"] + context @ w["context"])
    logits = new @ w["output"] + w["bias"]
    shifted = logits - logits.max(1, keepdim=True).values
    log_probs = shifted - torch.log(torch.exp(shifted).sum(1, keepdim=True))
    return log_probs.float(), (new[:, None], memory, mask)


def make_inputs(n, seed=1):
    """Prompts of lengths 1..6 and memories of lengths 1..MEMORY, different per input."""
    rng = np.random.default_rng(seed)
    inputs = []
    for i in range(n):
        prompt = [int(t) for t in rng.integers(3, VOCAB, 1 + i % 6)]
        memory = rng.normal(0, 1, (1, MEMORY, HIDDEN))
        mask = (np.arange(MEMORY) < 1 + (i * 3) % MEMORY).astype(np.float64)[None]
        inputs.append((prompt, memory, mask))
    return inputs


def numpy_prefill(prompt, memory, mask):
    """State after all but the last prompt token, and the token to start from (an LM's prefill)."""
    state = (np.zeros((1, 1, HIDDEN)), memory, mask)
    for token in prompt[:-1]:
        _, state = numpy_step(np.array([token]), state)
    return state, prompt[-1]


def torch_prefill(prompt, memory, mask):
    state = (torch.zeros(1, 1, HIDDEN, dtype=torch.float64), torch.from_numpy(memory), torch.from_numpy(mask))
    for token in prompt[:-1]:
        _, state = torch_step(torch.tensor([token]), state)
    return state, torch.tensor([prompt[-1]])


def concat_states(states):
    return tuple(np.concatenate(parts) for parts in zip(*states, strict=True))


def reference(params, prompt, memory, mask, steps_taken=None):
    """The torch reference for one request: list of (tokens, finish_reason, score); appends the number of
    decode steps it ran to `steps_taken` when given."""
    state, start = torch_prefill(prompt, memory, mask)
    calls = 0

    def counting_step(tokens, state):
        nonlocal calls
        calls += 1
        return torch_step(tokens, state)

    common = dict(eos_id=EOS, max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens,
                  no_repeat_ngram_size=params.no_repeat_ngram_size,
                  repetition_penalty=params.repetition_penalty, prompt_tokens=[prompt])
    if params.strategy == "greedy":
        hyps = greedy_decode(counting_step, state, start, **common)
    elif params.strategy == "sample":
        hyps = sample_decode(counting_step, state, start, seed=params.seed, temperature=params.temperature,
                             top_k=params.top_k, top_p=params.top_p, **common)
    else:
        hyps = beam_search(counting_step, state, start, beam_size=params.beam_size,
                           length_penalty=params.length_penalty, n_best=params.n_best,
                           early_stopping=params.early_stopping, **common)[0]
    if steps_taken is not None:
        steps_taken.append(calls)
    return [(h.tokens, h.finish_reason, h.score) for h in hyps]


def serve_token_by_token(requests, join_steps):
    """A minimal engine loop for greedy/sampling rows: rows join at different steps, finished rows leave,
    so every step exercises RowParams/TokenHistory filter and concatenate."""
    chooser = TokenChooser(EOS)
    results = {}
    ids, state, tokens, counts, totals = [], None, np.zeros(0, np.int64), np.zeros(0, np.int64), []
    rows, history, outputs = RowParams.empty(), TokenHistory.empty(VOCAB), []
    step = 0
    while len(results) < len(requests):
        joining = [i for i, s in enumerate(join_steps) if s == step]
        if joining:
            starts = [numpy_prefill(*requests[i][1:]) for i in joining]
            new_state = concat_states([s for s, _ in starts])
            state = new_state if state is None or not ids else concat_states([state, new_state])
            tokens = np.concatenate([tokens, [t for _, t in starts]]).astype(np.int64)
            counts = np.concatenate([counts, np.zeros(len(joining), np.int64)])
            rows = RowParams.concatenate([rows, *(RowParams.from_params(requests[i][0]) for i in joining)])
            history = TokenHistory.concatenate(
                [history, TokenHistory.from_prompts([requests[i][1] for i in joining], VOCAB)])
            ids += joining
            outputs += [[] for _ in joining]
            totals += [0.0 for _ in joining]
        step += 1
        if not ids:
            continue
        log_probs, state = numpy_step(tokens, state)
        choice = chooser.choose(log_probs, rows, history, counts)
        history.append(choice.tokens)
        counts += 1
        finished = np.zeros(len(ids), bool)
        for row, (token, log_prob) in enumerate(zip(choice.tokens.tolist(), choice.log_probs, strict=True)):
            totals[row] += float(log_prob)
            if token == EOS or counts[row] == rows.max_new_tokens[row]:
                finished[row] = True
                reason = "eos" if token == EOS else "length"
                generated = outputs[row] + ([] if token == EOS else [token])
                results[ids[row]] = [(generated, reason, totals[row])]
            else:
                outputs[row].append(token)
        keep = np.nonzero(~finished)[0]
        state = tuple(s[keep] for s in state)
        tokens, counts = choice.tokens[keep], counts[keep]
        rows, history = rows.filter(keep), history.filter(keep)
        ids = [ids[i] for i in keep]
        outputs = [outputs[i] for i in keep]
        totals = [totals[i] for i in keep]
    return [results[i] for i in range(len(requests))]


def serve_beams(requests, join_steps, beam_size, steps_taken=None):
    """A minimal engine loop for one beam group, with requests joining at different steps; fills
    `steps_taken` (when given) with the decode steps each request ran."""
    beams = BeamSearch(beam_size, VOCAB, EOS)
    results, state, tokens, step = {}, None, np.zeros(0, np.int64), 0
    steps = {}
    while len(results) < len(requests):
        joining = [i for i, s in enumerate(join_steps) if s == step]
        if joining:
            starts = [numpy_prefill(*requests[i][1:]) for i in joining]
            new_state = tuple(np.repeat(s, beam_size, axis=0) for s in concat_states([s for s, _ in starts]))
            state = new_state if state is None or len(beams) == 0 else concat_states([state, new_state])
            tokens = np.concatenate([tokens, np.repeat([t for _, t in starts], beam_size)]).astype(np.int64)
            beams.join(joining, [requests[i][0] for i in joining], [requests[i][1] for i in joining])
        step += 1
        if len(beams) == 0:
            continue
        log_probs, state = numpy_step(tokens, state)
        result = beams.step(log_probs)
        state = tuple(s[result.parent_rows] for s in state)
        tokens = result.next_tokens
        for request_id, hyps in result.done.items():
            results[request_id] = [(h.tokens, h.finish_reason.value, h.score) for h in hyps]
            steps[request_id] = step - join_steps[request_id]
    if steps_taken is not None:
        steps_taken.extend(steps[i] for i in range(len(requests)))
    return [results[i] for i in range(len(requests))]


def assert_same(server, expected):
    assert len(server) == len(expected)
    for got, want in zip(server, expected, strict=True):
        assert [(t, r) for t, r, _ in got] == [(t, r) for t, r, _ in want]
        assert [s for _, _, s in got] == pytest.approx([s for _, _, s in want], rel=1e-12, abs=1e-12)


def test_counter_uniforms_equal_the_reference_bit_for_bit():
    seeds = [0, 1, 2, 12345, 2**32 + 7, 2**63, 2**64 - 1]
    steps = [0, 1, 2, 99, 10**6]
    grid = [(s, t) for s in seeds for t in steps]
    numpy_values = counter_uniforms(np.array([s for s, _ in grid], dtype=np.uint64), [t for _, t in grid])
    assert numpy_values.tolist() == [counter_uniform(s, t) for s, t in grid]
    assert 0 < numpy_values.min() and numpy_values.max() <= 1


def test_greedy_matches_reference_with_rows_joining_and_leaving():
    inputs = make_inputs(6)
    settings = [
        DecodingParams(max_new_tokens=8),
        DecodingParams(max_new_tokens=10, min_new_tokens=4),
        DecodingParams(max_new_tokens=10, no_repeat_ngram_size=2),
        DecodingParams(max_new_tokens=12, repetition_penalty=1.8),
        DecodingParams(max_new_tokens=9, no_repeat_ngram_size=1, min_new_tokens=2),
        DecodingParams(max_new_tokens=7, repetition_penalty=1.3, no_repeat_ngram_size=3),
    ]
    requests = [(p, *inp) for p, inp in zip(settings, inputs, strict=True)]
    server = serve_token_by_token(requests, join_steps=[0, 0, 1, 3, 3, 5])
    assert_same(server, [reference(*r) for r in requests])
    assert {r[0][1] for r in server} == {"eos", "length"}  # both endings are exercised


@pytest.mark.parametrize("sorted_head", [None, 3])
def test_seeded_sampling_matches_reference_alone_and_in_a_batch_of_33(sorted_head, monkeypatch):
    if sorted_head is not None:  # sort only a few candidates per row: exercises the head and its fallback
        monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", sorted_head)
    rng = np.random.default_rng(7)
    inputs = make_inputs(33, seed=3)
    settings = []
    for i in range(33):
        if i % 11 == 10:
            settings.append(DecodingParams(max_new_tokens=8))  # greedy rows share the step
            continue
        settings.append(DecodingParams(
            strategy="sample", max_new_tokens=int(rng.integers(4, 10)), seed=int(rng.integers(0, 2**63)),
            temperature=float(rng.choice([0.5, 1.0, 1.7])), top_k=int(rng.choice([0, 3, 6])),
            top_p=float(rng.choice([1.0, 0.9, 0.6])), repetition_penalty=float(rng.choice([1.0, 1.4])),
            min_new_tokens=int(rng.choice([0, 2])), no_repeat_ngram_size=int(rng.choice([0, 2]))))
    requests = [(p, *inp) for p, inp in zip(settings, inputs, strict=True)]
    expected = [reference(*r) for r in requests]

    batch = serve_token_by_token(requests, join_steps=[i % 4 for i in range(33)])
    assert_same(batch, expected)
    for i in (0, 5, 17):
        assert_same(serve_token_by_token([requests[i]], join_steps=[0]), [expected[i]])
    assert len({tuple(r[0][0]) for r in batch}) > 20  # the rows really differ


def test_beam_search_matches_reference_with_requests_joining():
    inputs = make_inputs(5, seed=5)
    beam = dict(strategy="beam", beam_size=4)
    settings = [
        DecodingParams(**beam, max_new_tokens=8, n_best=3, length_penalty=0.6),
        DecodingParams(**beam, max_new_tokens=10, n_best=2, length_penalty=1.2, early_stopping=True),
        DecodingParams(**beam, max_new_tokens=6, n_best=4, length_penalty=0.0, min_new_tokens=3),
        DecodingParams(**beam, max_new_tokens=9, n_best=1, length_penalty=-0.5, no_repeat_ngram_size=2),
        DecodingParams(**beam, max_new_tokens=12, n_best=2, length_penalty=1.0, repetition_penalty=1.5),
    ]
    requests = [(p, *inp) for p, inp in zip(settings, inputs, strict=True)]
    server_steps, reference_steps = [], []
    server = serve_beams(requests, join_steps=[0, 0, 2, 3, 3], beam_size=4, steps_taken=server_steps)
    assert_same(server, [reference(*r, steps_taken=reference_steps) for r in requests])
    assert server_steps == reference_steps  # both stop at the same step, exact bound included
    assert any(s < r[0].max_new_tokens for s, r in zip(server_steps, requests, strict=True))


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.2])
def test_wide_beam_on_a_small_vocabulary_matches_reference(alpha):
    # K*V > 2K candidates with many -inf at the first steps: exercises dead beams and skipping.
    inputs = make_inputs(3, seed=11)
    params = DecodingParams(strategy="beam", beam_size=7, n_best=5, max_new_tokens=5, length_penalty=alpha)
    requests = [(params, *inp) for inp in inputs]
    server_steps, reference_steps = [], []
    server = serve_beams(requests, join_steps=[0, 1, 1], beam_size=7, steps_taken=server_steps)
    assert_same(server, [reference(*r, steps_taken=reference_steps) for r in requests])
    assert server_steps == reference_steps
