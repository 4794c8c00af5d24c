"""server/api/convert.py: DecodingOptions -> validated DecodingParams (errors name the proto field), and back."""

from __future__ import annotations

import math

import pytest

from seqserve.v1 import service_pb2 as pb
from seqserve.v1.manifest_pb2 import Manifest, ModelKind
from server.api import convert
from server.api.convert import params_from_pb
from server.decoding import DecodingParams, FinishReason, Hypothesis
from server.decoding.limits import RequestLimits
from server.errors import InvalidArgument
from training.tokenizer import train_tokenizer

LIMITS = RequestLimits(default_max_new_tokens=20, max_new_tokens=50, default_beam_size=3, max_beam_size=8,
                       max_sources=4)
S = pb.DecodingOptions


class Vocab:
    """The two tokenizer methods convert uses, over a tiny fixed vocabulary."""

    words = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "b", "c"]

    def id_to_token(self, token_id):
        return self.words[token_id] if 0 <= token_id < len(self.words) else None

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids if i > 3)


def test_unset_options_take_the_server_defaults():
    params = params_from_pb(S(), LIMITS)
    assert params == DecodingParams(max_new_tokens=20, beam_size=3)


def test_every_option_reaches_the_params():
    options = S(strategy=S.STRATEGY_BEAM, max_new_tokens=30, min_new_tokens=2, beam_size=5, length_penalty=0.6,
                n_best=3, early_stopping=True, stop=["x", "yz"], repetition_penalty=1.3, no_repeat_ngram_size=2,
                return_log_probs=True)
    params = params_from_pb(options, LIMITS)
    assert params == DecodingParams(strategy="beam", max_new_tokens=30, min_new_tokens=2, beam_size=5,
                                    length_penalty=0.6, n_best=3, early_stopping=True, stop=("x", "yz"),
                                    repetition_penalty=1.3, no_repeat_ngram_size=2, return_log_probs=True)
    sampled = params_from_pb(S(strategy=S.STRATEGY_SAMPLE, temperature=0.7, top_k=5, top_p=0.9, seed=2**64 - 1,
                               top_log_probs=3), LIMITS)
    # float32 on the wire, but the client's decimal arrives: 0.7, not 0.699999988079071.
    assert (sampled.temperature, sampled.top_k, sampled.top_p, sampled.seed) == (0.7, 5, 0.9, 2**64 - 1)
    assert sampled.top_logprobs == 3 and sampled.return_log_probs


def test_temperature_zero_means_greedy():
    assert params_from_pb(S(strategy=S.STRATEGY_SAMPLE, temperature=0), LIMITS).strategy == "greedy"
    for strategy in (S.STRATEGY_UNSPECIFIED, S.STRATEGY_GREEDY):
        assert params_from_pb(S(strategy=strategy, temperature=0), LIMITS).strategy == "greedy"
    assert params_from_pb(S(strategy=S.STRATEGY_BEAM, temperature=0, n_best=2), LIMITS).strategy == "beam"


@pytest.mark.parametrize(("options", "field", "message"), [
    (S(strategy=S.STRATEGY_SAMPLE, top_p=1.5), "options.top_p", "options.top_p must be in (0, 1], got 1.5"),
    (S(temperature=-1), "options.temperature", "options.temperature must be a finite number >= 0 (0 = greedy), got -1"),
    (S(max_new_tokens=51), "options.max_new_tokens", "options.max_new_tokens must be in [1, 50], got 51"),
    (S(max_new_tokens=-1), "options.max_new_tokens", "got -1"),
    (S(strategy=S.STRATEGY_BEAM, beam_size=9), "options.beam_size", "options.beam_size must be in [1, 8], got 9"),
    (S(strategy=S.STRATEGY_BEAM, beam_size=2, n_best=3), "options.n_best", "at most beam_size"),
    (S(n_best=2), "options.n_best", "unless strategy is STRATEGY_BEAM"),
    (S(beam_size=2), "options.beam_size", "unless strategy is STRATEGY_BEAM"),
    (S(top_log_probs=99), "options.top_log_probs", "options.top_log_probs must be in [0, 20], got 99"),
    (S(stop=["ok", ""]), "options.stop[1]", "options.stop[1] must be a non-empty string"),
    (S(repetition_penalty=0.5), "options.repetition_penalty", "got 0.5"),
    (S(top_k=-2), "options.top_k", "got -2"),
    (S(strategy=7), "options.strategy", "options.strategy must be one of STRATEGY_UNSPECIFIED"),
])
def test_bad_options_name_the_field_value_and_range(options, field, message):
    with pytest.raises(InvalidArgument) as caught:
        params_from_pb(options, LIMITS)
    assert caught.value.field == field
    assert message in caught.value.message


def test_generation_refuses_n_best():
    with pytest.raises(InvalidArgument, match="a generation has one result"):
        params_from_pb(S(strategy=S.STRATEGY_BEAM, n_best=2), LIMITS, single_result=True)


def test_sources_checks():
    assert convert.sources_from_pb(["a", "b"], LIMITS) == ["a", "b"]
    with pytest.raises(InvalidArgument, match="sources must be a list of 1 or more"):
        convert.sources_from_pb([], LIMITS)
    with pytest.raises(InvalidArgument, match=r"sources\[1\] must be a non-empty text"):
        convert.sources_from_pb(["a", "  "], LIMITS)
    with pytest.raises(InvalidArgument, match="at most 4 texts, got 5"):
        convert.sources_from_pb(["a"] * 5, LIMITS)


def test_hypothesis_and_chunk_messages():
    hypothesis = Hypothesis(tokens=[4, 5], score=-1.5, log_prob=-2.0, finish_reason=FinishReason.EOS)
    message = convert.hypothesis_to_pb(hypothesis, Vocab(), token_log_probs=[-0.5, -1.0],
                                       alternatives=[[(4, -0.5), (6, -2.0)], [(5, -1.0), (-1, math.nan)]],
                                       attention=[[0.25, 0.75], [1.0, 0.0]])
    assert message.text == "a b" and list(message.tokens) == ["a", "b"] and list(message.token_ids) == [4, 5]
    assert message.finish_reason == pb.FINISH_REASON_EOS and message.score == -1.5 and message.log_prob == -2.0
    assert list(message.token_log_probs) == [-0.5, -1.0]
    assert [[c.token for c in p.candidates] for p in message.top_log_probs] == [["a", "c"], ["b"]]
    assert [list(row.weights) for row in message.attention] == [[0.25, 0.75], [1.0, 0.0]]

    chunk = convert.chunk_to_pb([4, 6], "a c", 3, Vocab(), log_probs=[-0.1, -0.2])
    assert (list(chunk.tokens), chunk.first_token_index, list(chunk.log_probs)) == (["a", "c"], 3,
                                                                                 pytest.approx([-0.1, -0.2]))


def test_chunks_of_a_real_tokenizer_carry_its_token_strings():
    tokenizer = train_tokenizer("bpe", ["the cat sat on the mat", "héllo"] * 5, vocab_size=280)
    size = tokenizer.get_vocab_size()
    ids = [1, 5, 270, size - 1, size + 10]  # a special token, byte tokens, a merge, an id past the vocabulary
    chunk = convert.chunk_to_pb(ids, "x", 0, tokenizer, into=pb.TokenChunk())
    assert list(chunk.token_ids) == ids
    assert list(chunk.tokens) == [tokenizer.id_to_token(i) or "" for i in ids] and chunk.tokens[-1] == ""


def test_finish_reasons_all_map():
    assert {convert.finish_reason_to_pb(r) for r in FinishReason} == {
        pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP_SEQUENCE, pb.FINISH_REASON_CANCELLED}
    assert convert.finish_reason_to_pb(None) == pb.FINISH_REASON_UNSPECIFIED


def test_model_messages():
    manifest = Manifest(name="m", version=2, kind=ModelKind.MODEL_KIND_LM, cell="gru")
    info = convert.model_info_to_pb("m", 2, manifest, providers=["CPUExecutionProvider"],
                                    requested_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                                    variant="fp32", ready=True)
    assert info.manifest == manifest and list(info.providers) == ["CPUExecutionProvider"] and info.ready
    summary = convert.model_summary_to_pb("m", [2, 1], 2, ModelKind.MODEL_KIND_LM, True)
    assert list(summary.versions) == [1, 2] and summary.latest_version == 2
