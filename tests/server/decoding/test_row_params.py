"""server/decoding/row_params.py: RowParams, the per-row columns of decoding parameters a batch carries
through filter and concatenate."""

import numpy as np

from server.decoding.params import DecodingParams
from server.decoding.row_params import BEAM, GREEDY, SAMPLE, RowParams


def test_row_params_from_params_fills_every_column():
    rows = RowParams.from_params(DecodingParams(strategy="sample", seed=2**64 - 1, top_k=4, top_p=0.5,
                                                temperature=0.7, repetition_penalty=1.2, min_new_tokens=3,
                                                no_repeat_ngram_size=2, top_logprobs=5), n_rows=3)
    assert len(rows) == 3
    assert rows.strategy.tolist() == [SAMPLE] * 3
    assert rows.seed.dtype == np.uint64 and int(rows.seed[0]) == 2**64 - 1
    assert rows.top_k.tolist() == [4] * 3 and rows.top_p.tolist() == [0.5] * 3
    assert rows.temperature[0] == 0.7 and rows.repetition_penalty[0] == 1.2
    assert rows.min_new_tokens[0] == 3 and rows.no_repeat_ngram_size[0] == 2 and rows.top_logprobs[0] == 5
    assert rows.max_new_tokens[0] == 64


def test_row_params_draw_a_seed_only_for_unseeded_sampling():
    assert RowParams.from_params(DecodingParams()).seed.tolist() == [0]
    drawn = {int(RowParams.from_params(DecodingParams(strategy="sample")).seed[0]) for _ in range(5)}
    assert len(drawn) == 5


def test_row_params_filter_and_concatenate():
    greedy = RowParams.from_params(DecodingParams(max_new_tokens=5), 2)
    beam = RowParams.from_params(DecodingParams(strategy="beam", beam_size=3), 3)
    both = RowParams.concatenate([RowParams.empty(), greedy, beam])
    assert both.strategy.tolist() == [GREEDY, GREEDY, BEAM, BEAM, BEAM]
    picked = both.filter(np.array([4, 0, 0]))
    assert picked.strategy.tolist() == [BEAM, GREEDY, GREEDY]
    assert picked.max_new_tokens.tolist() == [64, 5, 5]
    assert len(both.filter(np.zeros(5, bool))) == 0
    assert len(RowParams.concatenate([])) == 0
