"""DecodingParams.validate: every field, with messages naming the field, the value and the allowed range."""

from dataclasses import replace

import pytest

from server.decoding.params import DecodingParams
from server.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SeqserveError,
    Unauthenticated,
    Unavailable,
)

LIMIT = 256


def error_for(**fields) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        DecodingParams(**fields).validate(LIMIT, max_beam_size=8)
    return caught.value


def test_defaults_and_every_strategy_are_valid():
    for strategy in ("greedy", "sample", "beam"):
        params = DecodingParams(strategy=strategy)
        validated = params.validate(LIMIT)
        assert validated.validated and not params.validated
        assert replace(validated, seed=None) == params  # as asked, but for the seed a sampling request draws
        assert (validated.seed is not None) == (strategy == "sample")
        assert validated.validate(1) is validated  # validated once: the engine does not validate it again
    DecodingParams(strategy="sample", seed=2**64 - 1, top_k=5, top_p=0.5, temperature=0.3,
                   stop=["\n", "x" * 64], top_logprobs=20).validate(LIMIT)
    DecodingParams(strategy="beam", beam_size=8, n_best=8, length_penalty=-2.0,
                   no_repeat_ngram_size=32).validate(LIMIT, max_beam_size=8)


def test_temperature_zero_means_greedy_for_every_strategy():
    # The proto's promise, kept by the domain type so in-process callers get it too.
    assert DecodingParams(strategy="sample", temperature=0.0, seed=3).validate(LIMIT) == \
        DecodingParams(strategy="greedy", temperature=1.0, seed=3)
    assert DecodingParams(strategy="greedy", temperature=0.0).validate(LIMIT) == DecodingParams(strategy="greedy")
    assert DecodingParams(strategy="beam", temperature=0, n_best=2).validate(LIMIT) == \
        DecodingParams(strategy="beam", n_best=2, temperature=1.0)


@pytest.mark.parametrize("fields, message", [
    (dict(strategy="topk"), "strategy must be one of 'greedy', 'sample', 'beam', got 'topk'"),
    (dict(max_new_tokens=0), "max_new_tokens must be in [1, 256], got 0"),
    (dict(max_new_tokens=257), "max_new_tokens must be in [1, 256], got 257"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer in [1, 256], got 2.5"),
    (dict(max_new_tokens=10, min_new_tokens=11),
     "min_new_tokens must be in [0, 10] (at most max_new_tokens), got 11"),
    (dict(min_new_tokens=-1), "min_new_tokens must be in [0, 64] (at most max_new_tokens), got -1"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0 (0 = greedy), got -0.5"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0 (0 = greedy), got inf"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0 (0 = greedy), got nan"),
    (dict(temperature="hot"), "temperature must be a finite number >= 0 (0 = greedy), got 'hot'"),
    (dict(top_k=-1), "top_k must be >= 0 (0 turns it off), got -1"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (dict(seed=-3), "seed must be in [0, 2**64 - 1] or unset, got -3"),
    (dict(seed=2**64), f"seed must be in [0, 2**64 - 1] or unset, got {2**64}"),
    (dict(beam_size=0), "beam_size must be in [1, 8], got 0"),
    (dict(beam_size=9), "beam_size must be in [1, 8], got 9"),
    (dict(length_penalty=11.0), "length_penalty must be a finite number in [-10, 10], got 11.0"),
    (dict(beam_size=4, n_best=5), "n_best must be in [1, 4] (at most beam_size), got 5"),
    (dict(n_best=0), "n_best must be in [1, 4] (at most beam_size), got 0"),
    (dict(early_stopping=1), "early_stopping must be true or false, got 1"),
    (dict(stop=tuple("abcdefghijklmnopq")), "stop must hold at most 16 strings, got 17"),
    (dict(stop=("ok", "")), "stop[1] must be a non-empty string, got ''"),
    (dict(stop=(3,)), "stop[0] must be a non-empty string, got 3"),
    (dict(stop=("y" * 65,)), "stop[0] must be at most 64 characters long, got 65 characters"),
    (dict(stop="abc"), "stop must be a list of strings, got 'abc'"),
    (dict(repetition_penalty=0.9),
     "repetition_penalty must be a finite number >= 1 (1 turns it off), got 0.9"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be in [0, 32] (0 turns it off), got -1"),
    (dict(no_repeat_ngram_size=33), "no_repeat_ngram_size must be in [0, 32] (0 turns it off), got 33"),
    (dict(return_log_probs="yes"), "return_log_probs must be true or false, got 'yes'"),
    (dict(top_logprobs=21), "top_logprobs must be in [0, 20], got 21"),
    (dict(strategy="beam", top_logprobs=2),
     "top_logprobs must be 0 with strategy 'beam' (alternatives are per-step, beams are not), got 2"),
])
def test_each_bad_field_is_named_with_its_value_and_range(fields, message):
    error = error_for(**fields)
    assert str(error) == message
    assert error.code == "INVALID_ARGUMENT"
    assert error.field is not None and message.startswith(error.field)
    assert error.allowed and error.allowed in message


def test_fields_carry_the_offending_value():
    error = error_for(top_p=1.5)
    assert (error.field, error.value, error.allowed) == ("top_p", 1.5, "in (0, 1]")


def test_booleans_are_not_integers():
    assert str(error_for(top_k=True)) == "top_k must be an integer >= 0 (0 turns it off), got True"


def test_stop_list_is_normalised_to_a_tuple():
    assert DecodingParams(stop=["a", "b"]).stop == ("a", "b")


def test_with_seed_draws_once_and_keeps_a_given_seed():
    drawn = DecodingParams(strategy="sample").with_seed()
    assert drawn.seed is not None and 0 <= drawn.seed < 2**64
    assert drawn.with_seed() is drawn
    assert DecodingParams(seed=5).with_seed().seed == 5


def test_error_codes_are_grpc_status_names():
    codes = {InvalidArgument: "INVALID_ARGUMENT", NotFound: "NOT_FOUND",
             FailedPrecondition: "FAILED_PRECONDITION", ResourceExhausted: "RESOURCE_EXHAUSTED",
             DeadlineExceeded: "DEADLINE_EXCEEDED", Unavailable: "UNAVAILABLE",
             Unauthenticated: "UNAUTHENTICATED"}
    for error_type, code in codes.items():
        error = error_type("message")
        assert isinstance(error, SeqserveError)
        assert error.code == code and str(error) == "message" and error.message == "message"


def test_invalid_argument_needs_a_message_or_all_parts():
    with pytest.raises(TypeError):
        InvalidArgument(field="top_p", value=2.0)
    assert str(InvalidArgument(field="x", value=None, allowed="set")) == "x must be set, got None"
