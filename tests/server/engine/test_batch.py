"""server/engine/batch.py: filter and concatenate carry every per-row array; seq2seq memory padding is inert."""

from __future__ import annotations

import numpy as np
import pytest

from exporters.bundle import ExportOptions, export_run
from exporters.parity import ParitySettings
from server.bundle import load_bundle
from server.decoding import DecodingParams, RowParams, TokenHistory
from server.engine.batch import ChooserRows, DecodeBatch
from server.engine.runner import Runner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_EXPORT = ExportOptions(eval_limit=10, real_inputs=50,
                             parity=ParitySettings(greedy_inputs=5, beam_inputs=2, max_new_tokens=10))


def row(history, index: int):
    """The tokens of one row of a TokenHistory (up to its length)."""
    return history.tokens[index, : history.lengths[index]]


def make_batch(rows, width, first_owner=0, group=0):
    """A batch whose every value names its row, with sources of `width` (mask ones then zeros)."""
    owners = np.arange(first_owner, first_owner + rows)
    state = (owners[:, None, None] * np.ones((rows, 2, 3), np.float32),)
    lengths = np.minimum(np.arange(rows) + 1, width)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.float32)
    memory = (owners[:, None, None] + 0.5) * mask[..., None] * np.ones((rows, width, 4), np.float32)
    return DecodeBatch(state, owners * 10, owners, np.full(rows, group), memory, mask)


def test_filter_reorders_every_array_and_trims_memory():
    batch = make_batch(4, width=6)  # row r has r + 1 source positions
    kept = batch.filter(np.array([2, 0, 0]))
    assert kept.owners.tolist() == [2, 0, 0] and kept.tokens.tolist() == [20, 0, 0]
    assert kept.state[0][:, 0, 0].tolist() == [2, 0, 0]
    assert kept.memory.shape == (3, 3, 4) and kept.mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert kept.memory[0, 2, 0] == 2.5 and kept.memory.flags.c_contiguous


def test_a_beam_reorder_does_not_copy_memory():
    batch = make_batch(4, width=5)
    reordered = batch.filter(np.array([1, 1, 3, 2]), memory_index=np.arange(4))
    assert reordered.memory is batch.memory and reordered.mask is batch.mask
    assert reordered.state[0][:, 0, 0].tolist() == [1, 1, 3, 2]


def test_concatenate_pads_memory_to_the_widest_source():
    joined = DecodeBatch.concatenate([make_batch(2, width=2), make_batch(3, width=5, first_owner=10, group=3)])
    assert joined.owners.tolist() == [0, 1, 10, 11, 12] and joined.groups.tolist() == [0, 0, 3, 3, 3]
    assert joined.memory.shape == (5, 5, 4)
    assert joined.mask[:2].tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert not joined.memory[:2, 2:].any()
    assert DecodeBatch.concatenate([DecodeBatch.empty([(2, 3)], 4), make_batch(1, 2)]).owners.tolist() == [0]


def test_chooser_rows_follow_their_rows():
    rows = RowParams.concatenate([RowParams.from_params(DecodingParams(max_new_tokens=n)) for n in (3, 5, 7)])
    part = ChooserRows.start(rows, [[1, 4], [1], [1, 5, 6]], vocab_size=8, tracked=["a", "b", "c"],
                             plain=[True, False, True], keys=[10, 11, 12], consumers=[0, 1, 0])
    part.advance(np.array([2, 3, 4]), np.array([-0.5, -1.0, -2.0]))
    part.advance(np.array([5, 6, 7]), np.array([-0.25, -1.0, -1.0]))
    kept = ChooserRows.concatenate([part.filter(np.array([True, False, True])),
                                    ChooserRows.start(RowParams.from_params(DecodingParams()), [[1]], 8, ["d"])])
    assert kept.rows.max_new_tokens.tolist() == [3, 7, 64]
    assert kept.generated.tolist() == [2, 2, 0]
    assert kept.log_prob.tolist() == [-0.75, -3.0, 0.0]
    assert kept.tracked.tolist() == ["a", "c", "d"]
    assert kept.plain.tolist() == [True, True, False]
    assert kept.keys.tolist() == [10, 12, 0] and kept.consumers.tolist() == [0, 0, 0]
    assert [row(kept.history, i).tolist() for i in range(3)] == [[1, 4, 2, 5], [1, 5, 6, 4, 7], [1]]
    assert kept.generated_ids(1) == [4, 7] and kept.generated_ids(1, drop_last=True) == [4]
    assert kept.generated_ids(2) == []
    assert isinstance(kept.history, TokenHistory)


def test_padding_the_source_axis_does_not_change_a_rows_log_probs(tiny_runs, tmp_path):
    """The seq2seq decoder step on a row with memory padded (zeros, mask 0) gives the same numbers."""
    path = export_run(tiny_runs["lstm", "seq2seq"], tmp_path, "tiny-s2s", options=SMALL_EXPORT).path
    runner = Runner(load_bundle(path, session_options={"intra_op_num_threads": 1}))
    sources = [[4, 5], [6, 7, 8, 9, 10, 11, 4, 5, 6]]
    memory, mask, state = runner.encode(sources)
    short_memory, short_mask, short_state = runner.encode(sources[:1])
    assert memory.shape[1] == 9 and short_memory.shape[1] == 2
    np.testing.assert_allclose(memory[0, :2], short_memory[0], atol=1e-6)
    assert not memory[0, 2:].any() and mask[0].tolist() == [1, 1] + [0] * 7

    def step(memory, mask, state, rows):
        batch = DecodeBatch(state, np.array([1] * rows), np.arange(rows), np.zeros(rows, np.int64), memory, mask)
        return runner.decode(batch)

    for _ in range(4):  # a few steps, each from the previous step's state
        padded = step(memory, mask, state, 2)
        alone = step(short_memory, short_mask, short_state, 1)
        np.testing.assert_allclose(padded[0][0], alone[0][0], atol=1e-6)
        for a, b in zip(padded[1], alone[1], strict=True):
            np.testing.assert_allclose(a[0], b[0], atol=1e-6)
        assert not padded[2][0, 2:].any()  # no attention on padding
        state, short_state = padded[1], alone[1]
