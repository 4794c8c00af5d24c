"""Constrained decoding in the engine, on the repository's real models (fortunes-lm: characters; g2p-en: a
word-level phone vocabulary): every output is checked by an independent judge (Python's `re`, `jsonschema`,
forced decoding through the same graphs), whatever else shares the batch.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.bundle import load_bundle
from server.decoding import Constraint, DecodingParams, FinishReason, gnmt_length_penalty
from server.decoding.limits import RequestLimits
from server.engine import EngineConfig, GenerationRequest, ModelEngine, TranslationRequest
from server.engine.constraints import compiler_for
from server.errors import FailedPrecondition, InvalidArgument

MODELS = Path(__file__).resolve().parents[3] / "models"
ONE_THREAD = {"intra_op_num_threads": 1, "inter_op_num_threads": 1}
BOS, EOS = 1, 2


class Running:
    """A started engine on its own event loop thread; `run(coroutine)` from the test's thread."""

    def __init__(self, bundle_dir: Path, config: EngineConfig | None = None):
        self.bundle = load_bundle(bundle_dir, session_options=ONE_THREAD)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.engine = ModelEngine(self.bundle, config or EngineConfig())
        self.run(self.engine.start())

    def run(self, coroutine, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def finish_all(self, requests):
        async def go():
            streams = [self.engine.submit(r) for r in requests]
            return await asyncio.gather(*(s.result() for s in streams))

        return self.run(go())

    def close(self):
        self.run(self.engine.stop(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


@pytest.fixture(scope="module")
def lm():
    running = Running(MODELS / "fortunes-lm" / "1")
    yield running
    running.close()


@pytest.fixture(scope="module")
def g2p():
    running = Running(MODELS / "g2p-en" / "1")
    yield running
    running.close()


def prompt_ids(running: Running, text: str) -> list[int]:
    return [BOS, *running.bundle.tokenizer("text").encode(text).ids]


def generation(running, text, params, rid="r"):
    return GenerationRequest(rid, prompt_ids(running, text), params)


# --- regexes: Python's `re` judges every output ----------------------------------------------------------

_LETTERS = "aehilnorst"


@st.composite
def bounded_regexes(draw) -> tuple[str, int]:
    """(a regex over the fortunes alphabet, the longest text it matches): literals, classes, alternations,
    optional parts and bounded repeats, so every match ends within a known number of characters."""

    def atom():
        kind = draw(st.sampled_from(["char", "char", "class", "punct"]))
        if kind == "char":
            return re.escape(draw(st.sampled_from(_LETTERS + " "))), 1
        if kind == "punct":
            return "[" + re.escape("".join(draw(st.sets(st.sampled_from(".,!?-'"), min_size=1, max_size=3)))) + "]", 1
        low = draw(st.sampled_from(_LETTERS[:5]))
        return f"[{low}-{draw(st.sampled_from(_LETTERS[5:]))}]", 1

    def sequence(depth):
        parts = [piece(depth) for _ in range(draw(st.integers(1, 3)))]
        return "".join(p for p, _ in parts), sum(n for _, n in parts)

    def piece(depth):
        shape = draw(st.sampled_from(["atom", "atom", "group", "repeat", "optional"] if depth < 2 else ["atom"]))
        if shape == "atom":
            return atom()
        alternatives = [sequence(depth + 1) for _ in range(draw(st.integers(1, 3)))]
        group = "(" + "|".join(p for p, _ in alternatives) + ")"
        longest = max(n for _, n in alternatives)
        if shape == "group":
            return group, longest
        if shape == "optional":
            return group + "?", longest
        low = draw(st.integers(0, 2))
        high = draw(st.integers(max(low, 1), 3))
        return group + f"{{{low},{high}}}", longest * high

    return sequence(0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=bounded_regexes(), seed=st.integers(0, 2**32))
def test_sampled_outputs_full_match_their_regex(lm, case, seed):
    pattern, longest = case
    params = [DecodingParams(strategy="sample", temperature=1.5, seed=seed + i, max_new_tokens=longest + 1,
                             constraint=Constraint.regex(pattern)) for i in range(6)]
    finishes = lm.finish_all([generation(lm, "Q: what now?\nA: ", p, f"r{i}") for i, p in enumerate(params)])
    for finish in finishes:
        assert finish.reason is FinishReason.EOS, (pattern, finish.text, finish.reason)
        assert re.fullmatch(pattern, finish.text), (pattern, finish.text)


def test_a_seeded_constrained_row_gives_the_same_text_whatever_shares_the_batch(lm):
    pattern = r"[a-z]{1,6}( [a-z]{1,6}){2,5}[.!]"
    seeded = DecodingParams(strategy="sample", temperature=1.2, seed=42, max_new_tokens=60,
                            constraint=Constraint.regex(pattern))
    (alone,) = lm.finish_all([generation(lm, "The ", seeded)])
    neighbours = [generation(lm, "It was ", DecodingParams(strategy="sample", seed=i, max_new_tokens=30), f"n{i}")
                  for i in range(3)]
    neighbours += [generation(lm, "Yes", DecodingParams(constraint=Constraint.regex("[A-Z]+")), "c1"),
                   generation(lm, "No", DecodingParams(strategy="beam", beam_size=3,
                                                       constraint=Constraint.choice(["a", "bb"])), "c2")]
    together = lm.finish_all([*neighbours[:2], generation(lm, "The ", seeded, "again"), *neighbours[2:]])
    assert together[2].generated_ids == alone.generated_ids and together[2].text == alone.text
    assert re.fullmatch(pattern, alone.text)
    assert re.fullmatch("[A-Z]+", together[4].text)
    assert together[5].text in ("a", "bb")


def test_max_new_tokens_first_leaves_a_prefix_the_constraint_allows(lm):
    constraint = Constraint.regex(r"[a-z]+( [a-z]+)*\.")
    (finish,) = lm.finish_all([generation(lm, "The ", DecodingParams(max_new_tokens=7, constraint=constraint))])
    assert finish.reason is FinishReason.LENGTH and len(finish.generated_ids) == 7
    matcher = compiler_for(lm.bundle.tokenizer("text"), lm.bundle.spec.vocab_size, EOS,
                           RequestLimits().constraints).matcher(constraint)
    assert matcher.consume_tokens(finish.generated_ids) and not matcher.is_error()
    assert re.fullmatch(r"[a-z]+( [a-z]+)*", finish.text)


def test_stop_strings_and_min_new_tokens_keep_to_the_constraint(lm):
    constraint = Constraint.regex(r"(yes|no)(, (yes|no)){0,9}\.")
    stopped, at_least = lm.finish_all([
        generation(lm, "Say it: ", DecodingParams(stop=("no",), max_new_tokens=60, constraint=constraint), "s"),
        generation(lm, "Say it: ", DecodingParams(min_new_tokens=8, max_new_tokens=60, constraint=constraint), "m"),
    ])
    assert stopped.reason in (FinishReason.STOP_SEQUENCE, FinishReason.EOS)
    assert "no" not in stopped.text
    assert at_least.reason is FinishReason.EOS and len(at_least.generated_ids) >= 8
    assert re.fullmatch(r"(yes|no)(, (yes|no)){0,9}\.", at_least.text)


def test_the_constraint_wins_over_min_new_tokens_once_only_the_end_is_left(lm):
    (finish,) = lm.finish_all([generation(lm, "Q: ", DecodingParams(min_new_tokens=10, max_new_tokens=20,
                                                                     constraint=Constraint.regex("ok")))])
    assert (finish.text, finish.reason) == ("ok", FinishReason.EOS)


# --- choices: scored whole by forced decoding through the same graphs -------------------------------------

def forced_log_prob(running: Running, prompt: list[int], tokens: list[int]) -> float:
    """log P(tokens, then <eos> | prompt) by one prefill of the prompt and the tokens."""

    async def go():
        state = running.engine.zero_state(1)
        _, log_probs = await running.engine.feed(state, [*prompt, *tokens], True, next_token_id=EOS)
        return float(np.sum(log_probs[len(prompt) - 1:], dtype=np.float64))

    return running.run(go())


CHOICES = ["yes", "no", "maybe", "never", "no way"]


@pytest.mark.parametrize("prompt", ["Q: Is it true?\nA: ", "He said ", ""])
def test_greedy_choice_is_the_choice_the_model_scores_highest(lm, prompt):
    ids = prompt_ids(lm, prompt)
    (finish,) = lm.finish_all([GenerationRequest("g", ids, DecodingParams(constraint=Constraint.choice(CHOICES)))])
    tokenizer = lm.bundle.tokenizer("text")
    scores = {c: forced_log_prob(lm, ids, tokenizer.encode(c).ids) for c in CHOICES}
    assert finish.text == max(scores, key=scores.get)
    assert finish.reason is FinishReason.EOS
    assert math.isclose(finish.hypotheses[0].log_prob, scores[finish.text], abs_tol=1e-4)


def test_beam_n_best_are_choices_scored_as_forced_decoding_scores_them(lm):
    ids = prompt_ids(lm, "Q: Are you happy?\nA: ")
    params = DecodingParams(strategy="beam", beam_size=4, n_best=4, length_penalty=0.6,
                            constraint=Constraint.choice(CHOICES))
    (finish,) = lm.finish_all([GenerationRequest("b", ids, params)])
    assert len(finish.hypotheses) == 4
    for text, hypothesis in zip(finish.texts, finish.hypotheses, strict=True):
        assert text in CHOICES
        forced = forced_log_prob(lm, ids, list(hypothesis.tokens))
        assert math.isclose(hypothesis.log_prob, forced, abs_tol=1e-4)
        assert math.isclose(hypothesis.score, forced / gnmt_length_penalty(len(hypothesis.tokens), 0.6),
                            abs_tol=1e-4)
    assert [h.score for h in finish.hypotheses] == sorted((h.score for h in finish.hypotheses), reverse=True)


# --- JSON schema: every output parses and validates ---------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "odd"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "mood", "tags"],
    "additionalProperties": False,
}


def test_json_schema_outputs_parse_and_validate_for_50_seeds(lm):
    constraint = Constraint.json_schema(json.dumps(SCHEMA))
    requests = [generation(lm, "Data: ", DecodingParams(strategy="sample", seed=seed, temperature=1.0,
                                                         max_new_tokens=200, constraint=constraint), f"j{seed}")
                for seed in range(50)]
    for finish in lm.finish_all(requests):
        assert finish.reason is FinishReason.EOS, finish.text
        jsonschema.validate(json.loads(finish.text), SCHEMA)


def test_a_lark_grammar_shapes_the_output(lm):
    grammar = 'start: greeting " " name "!"\ngreeting: "hello" | "hi"\nname: /[a-z]{2,8}/\n'
    finishes = lm.finish_all([generation(lm, "", DecodingParams(strategy="sample", seed=s, max_new_tokens=30,
                                                                 constraint=Constraint.grammar(grammar)), f"l{s}")
                              for s in range(5)])
    for finish in finishes:
        assert re.fullmatch(r"(hello|hi) [a-z]{2,8}!", finish.text), finish.text


# --- word-level vocabularies: separators count ----------------------------------------------------------

def test_g2p_outputs_match_phone_patterns_with_their_separators(g2p):
    source = g2p.bundle.tokenizer("source")
    pattern = r"(K|G) (AE1|AA1|AH0) [A-Z]+[0-2]?( [A-Z]+[0-2]?)?"
    requests = [TranslationRequest(f"t{i}", source.encode(word).ids,
                                   DecodingParams(strategy="sample", seed=i, temperature=1.5, max_new_tokens=8,
                                                  constraint=Constraint.regex(pattern)))
                for i, word in enumerate(["cat", "cut", "gap", "cot"])]
    for finish in g2p.finish_all(requests):
        assert finish.reason is FinishReason.EOS and re.fullmatch(pattern, finish.text), finish.text


def test_g2p_answer_is_restricted_to_a_lexicons_candidates(g2p):
    source = g2p.bundle.tokenizer("source").encode("cat").ids
    candidates = ["K AE1 T", "K AA1 T", "S IH1 T"]
    greedy, beam = g2p.finish_all([
        TranslationRequest("g", source, DecodingParams(constraint=Constraint.choice(candidates))),
        TranslationRequest("b", source, DecodingParams(strategy="beam", beam_size=3, n_best=3, length_penalty=0.0,
                                                       constraint=Constraint.choice(candidates))),
    ])
    assert sorted(beam.texts) == sorted(candidates)
    assert greedy.text == beam.texts[0] == "K AE1 T"  # every choice scored whole: the best one


def test_a_pattern_without_separators_cannot_be_spelled_in_words(g2p):
    source = g2p.bundle.tokenizer("source").encode("cat").ids
    with pytest.raises(InvalidArgument, match=r"constraint\.regex accepts no text .* words joined by ' '"):
        g2p.engine.submit(TranslationRequest("x", source, DecodingParams(constraint=Constraint.regex("KAET"))))


# --- refusals, before anything is queued ----------------------------------------------------------------

@pytest.mark.parametrize("constraint, field, words", [
    (Constraint.regex("(ab"), "constraint.regex", "unclosed group"),
    (Constraint.regex(r"(a)\1"), "constraint.regex", "backreferences are not supported"),
    (Constraint.json_schema("{"), "constraint.json_schema", "not valid JSON"),
    (Constraint.grammar("start: nowhere"), "constraint.grammar", "unknown name"),
    (Constraint.regex("[\u4e00-\u4e09]+"), "constraint.regex", "vocabulary can spell"),
    (Constraint.regex("a{100000}"), "constraint.regex", "too costly"),
    (Constraint.choice(["ok", ""]), "constraint.choice.values[1]", "non-empty"),
])
def test_bad_constraints_are_refused_naming_the_field(lm, constraint, field, words):
    with pytest.raises(InvalidArgument) as caught:
        lm.engine.submit(generation(lm, "x", DecodingParams(constraint=constraint)))
    error = caught.value
    assert error.field == field and words in error.message
    assert len(error.message) <= len(field) + 40 + 200


def test_a_tokenizer_the_server_cannot_follow_takes_no_constraint(lm):
    from tokenizers import Tokenizer, decoders

    tokenizer = Tokenizer.from_str(lm.bundle.tokenizer("text").to_str())
    tokenizer.decoder = decoders.WordPiece()
    with pytest.raises(FailedPrecondition, match="takes no constraint"):
        compiler_for(tokenizer, lm.bundle.spec.vocab_size, EOS, RequestLimits().constraints)
