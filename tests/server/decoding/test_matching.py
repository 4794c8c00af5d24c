"""Constraints as data (`constraint.py`, in DecodingParams) and compiled (`matching.py`): shapes refused with
the field named, the greedy-choice rewrite, the per-process cache, the rows' matchers through filter and
concatenate, and the mask in the processor chain."""

from __future__ import annotations

import asyncio
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from server.decoding import Constraint, DecodingParams, RowParams, TokenChooser, TokenHistory
from server.decoding.matching import (
    AllowedTokens,
    ConstraintCompiler,
    ConstraintRows,
    ConstraintSettings,
    _renamed_start,
    allowed_tokens,
)
from server.engine.constraints import check_constraint
from server.errors import InvalidArgument
from server.text.table import TokenTable

TOKENIZER = Path(__file__).resolve().parents[3] / "models" / "fortunes-lm" / "1" / "tokenizer.json"
EOS = 2


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(TOKENIZER))


def compiler_of(tokenizer, **settings) -> ConstraintCompiler:
    table = TokenTable.build(tokenizer)
    return ConstraintCompiler(table.pieces, table.silent, EOS, table.separator, ConstraintSettings(**settings))


def allowed_texts(tokenizer, matcher) -> set[str]:
    (allowed,) = allowed_tokens([ConstraintRows.of([matcher])], tokenizer.get_vocab_size(), EOS)
    return {tokenizer.id_to_token(int(i)) for i in np.flatnonzero(allowed.mask[0])}


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text).ids


# --- the data ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("constraint, field, words", [
    (Constraint("xml", "<a/>"), "constraint", "one of regex, choice, json_schema, grammar"),
    (Constraint.regex(""), "constraint.regex", "a non-empty string"),
    (Constraint.choice([]), "constraint.choice.values", "a list of 1 to 1024 strings"),
    (Constraint.choice(["a", 3]), "constraint.choice.values[1]", "a non-empty string"),
    (Constraint.grammar("x" * 101), "constraint.grammar", "at most 100 characters"),
    (Constraint("regex", "a", ("b",)), "constraint.regex", "only a choice constraint has values"),
])
def test_a_badly_shaped_constraint_names_its_field(constraint, field, words):
    with pytest.raises(InvalidArgument) as caught:
        DecodingParams(constraint=constraint).validate(64, max_constraint_chars=100)
    assert caught.value.field == field and words in caught.value.message


def test_greedy_with_choices_becomes_a_beam_with_one_row_per_choice():
    choice = Constraint.choice(["yes", "no", "no", "maybe"])
    params = DecodingParams(constraint=choice, length_penalty=2.0).validate(64)
    assert (params.strategy, params.beam_size, params.n_best, params.length_penalty) == ("beam", 3, 1, 0.0)
    sampled_at_zero = DecodingParams(strategy="sample", temperature=0.0, beam_size=2,
                                     constraint=choice).validate(64, max_beam_size=2)
    assert (sampled_at_zero.strategy, sampled_at_zero.beam_size) == ("beam", 2)
    assert DecodingParams(strategy="sample", constraint=choice).validate(64).strategy == "sample"
    with pytest.raises(InvalidArgument, match="scored whole"):
        DecodingParams(constraint=choice, top_logprobs=2).validate(64)


def test_params_with_a_constraint_cross_processes_as_plain_data():
    params = DecodingParams(strategy="sample", seed=1, constraint=Constraint.json_schema('{"type": "integer"}'))
    assert pickle.loads(pickle.dumps(params)) == params


# --- compiling -----------------------------------------------------------------------------------------

def test_masks_follow_the_text_and_end_with_eos(tokenizer):
    compiler = compiler_of(tokenizer)
    matcher = compiler.matcher(Constraint.regex(r"(yes|no|maybe)[.!]"))
    assert allowed_texts(tokenizer, matcher) == {"y", "n", "m"}
    assert matcher.consume_tokens(ids(tokenizer, "ye"))
    assert allowed_texts(tokenizer, matcher) == {"s"}
    assert matcher.consume_tokens(ids(tokenizer, "s!"))
    assert allowed_texts(tokenizer, matcher) == {"<eos>"}


def test_a_forced_start_is_allowed_token_by_token(tokenizer):
    matcher = compiler_of(tokenizer).matcher(Constraint.choice(["hello world", "help"]))
    seen = []
    for character in "hello world":
        seen.append(allowed_texts(tokenizer, matcher))
        assert matcher.consume_tokens(ids(tokenizer, character))
    assert seen[:4] == [{"h"}, {"e"}, {"l"}, {"l", "p"}] and allowed_texts(tokenizer, matcher) == {"<eos>"}


def test_compiled_constraints_are_cached_and_bounded(tokenizer):
    compiler = compiler_of(tokenizer, cache_entries=2)
    first = compiler.compile(Constraint.regex("a+"))
    assert compiler.compile(Constraint.regex("a+")) is first
    compiler.compile(Constraint.regex("b+"))
    compiler.compile(Constraint.regex("c+"))
    assert not compiler.cached(Constraint.regex("a+")) and compiler.cached(Constraint.regex("c+"))
    with pytest.raises(InvalidArgument):
        compiler.compile(Constraint.regex("(x"))
    assert compiler.cached(Constraint.regex("(x"))  # a bad one sent again costs nothing
    copy = compiler.matcher(Constraint.regex("c+"))
    assert copy is not compiler.compile(Constraint.regex("c+"))


def test_the_compilers_reason_is_cut_to_200_characters(tokenizer):
    with pytest.raises(InvalidArgument) as caught:
        compiler_of(tokenizer).compile(Constraint.grammar("start: " + " ".join(f"r{i}" for i in range(200))))
    message = caught.value.message
    assert message.startswith("constraint.grammar does not compile: ")
    assert len(message) - len("constraint.grammar does not compile: ") <= 200


def test_a_compile_past_its_time_is_refused_and_stays_refused(tokenizer):
    params = DecodingParams(constraint=Constraint.regex("a{100000}"))
    settings = ConstraintSettings(compile_seconds=0.01)

    async def check():
        await check_constraint(params, tokenizer, tokenizer.get_vocab_size(), EOS, settings)

    with pytest.raises(InvalidArgument, match=r"did not compile within 0\.01 seconds"):
        asyncio.run(check())
    started = time.monotonic()
    with pytest.raises(InvalidArgument, match=r"did not compile within 0\.01 seconds"):
        asyncio.run(check())
    assert time.monotonic() - started < 5  # answered from the cache, not compiled again


def test_a_lark_grammar_keeps_its_strings_when_its_start_is_renamed():
    grammar = 'start: "start" item // the start\nitem: /start|x/ | start'
    assert _renamed_start(grammar) == ('seqserve_user_start: "start" item // the start\n'
                                       'item: /start|x/ | seqserve_user_start')


# --- the rows' matchers ----------------------------------------------------------------------------------

def test_a_parent_with_several_children_is_copied_for_each(tokenizer):
    compiler = compiler_of(tokenizer)
    parent = compiler.matcher(Constraint.regex("(ab|ac)d"))
    assert parent.consume_tokens(ids(tokenizer, "a"))
    rows = ConstraintRows.of([parent, None])
    children = rows.filter(np.array([0, 0, 1]))
    assert children.count == 2 and children.matchers[0] is parent and children.matchers[1] is not parent
    children.consume(np.array(ids(tokenizer, "bc") + [0]))  # taken with the next masks, or now:
    children.settle()
    assert allowed_texts(tokenizer, children.matchers[0]) == allowed_texts(tokenizer, children.matchers[1]) == {"d"}
    assert children.matchers[0].consume_tokens(ids(tokenizer, "d"))
    merged = ConstraintRows.concatenate([children, ConstraintRows.empty(2)])
    assert len(merged) == 5 and merged.count == 2
    assert ConstraintRows.concatenate([ConstraintRows.empty(1), ConstraintRows.empty(2)]).count == 0


def test_a_dead_end_allows_only_the_end(tokenizer):
    matcher = compiler_of(tokenizer).matcher(Constraint.regex("a\u4e00|b"))  # "a" leads nowhere, "b" is fine
    assert allowed_texts(tokenizer, matcher) == {"a", "b"}
    assert matcher.consume_tokens(ids(tokenizer, "a"))
    (allowed,) = allowed_tokens([ConstraintRows.of([matcher])], tokenizer.get_vocab_size(), EOS)
    assert np.flatnonzero(allowed.mask[0]).tolist() == [EOS]


def test_the_mask_comes_last_and_wins_over_min_new_tokens():
    log_probs = np.log(np.full((2, 6), 1 / 6, dtype=np.float32))
    log_probs[:, 4] = np.log(0.5)
    rows = RowParams.concatenate([RowParams.from_params(DecodingParams(min_new_tokens=3)) for _ in range(2)])
    history = TokenHistory.from_prompts([[1], [1]], 6)
    only_end = np.zeros((1, 6), dtype=bool)
    only_end[0, EOS] = True
    choice = TokenChooser(EOS).choose(log_probs, rows, history, np.zeros(2, np.int64),
                                      AllowedTokens(np.array([1]), only_end, np.where(only_end, 0.0, -np.inf),
                                                    np.array([True])))
    assert choice.tokens.tolist() == [4, EOS]  # row 0 is free; row 1 may only end, min_new_tokens or not
    assert choice.log_probs[1] == pytest.approx(np.log(1 / 6))
