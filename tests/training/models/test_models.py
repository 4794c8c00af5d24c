"""Models: explicit state in and out, padding never changes a row, one code path for every cell."""

from __future__ import annotations

import pytest
import torch

from training.models import LanguageModel, LMArgs, Seq2Seq, Seq2SeqArgs, build_model
from training.models.rnn import make_rnn

CELLS = ["lstm", "gru", "rnn"]


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("cell", CELLS)
def test_lm_state_shapes_and_padding_independence(cell):
    model = LanguageModel(LMArgs(vocab_size=30, cell=cell, embedding_size=8, hidden_size=12)).eval()
    tokens = torch.randint(4, 30, (3, 6))
    lengths = torch.tensor([6, 2, 4])
    log_probs, *state = model(tokens, lengths, *model.initial_state(3))
    assert log_probs.shape == (3, 6, 30)
    assert [s.shape for s in state] == [(3, 2, 12)] * (2 if cell == "lstm" else 1)
    # Row 1 alone, without padding, must give the same state and log-probs as inside the padded batch.
    alone, *alone_state = model(tokens[1:2, :2], lengths[1:2], *model.initial_state(1))
    torch.testing.assert_close(alone, log_probs[1:2, :2])
    for a, b in zip(alone_state, state, strict=True):
        torch.testing.assert_close(a, b[1:2])


@pytest.mark.parametrize("cell", CELLS)
def test_lm_state_carries_across_calls(cell):
    model = LanguageModel(LMArgs(vocab_size=20, cell=cell, embedding_size=8, hidden_size=12)).eval()
    tokens = torch.randint(4, 20, (2, 7))
    whole, *_ = model(tokens, torch.tensor([7, 7]), *model.initial_state(2))
    first, *state = model(tokens[:, :3], torch.tensor([3, 3]), *model.initial_state(2))
    second, *_ = model(tokens[:, 3:], torch.tensor([4, 4]), *state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("attention", ["dot", "general", "bahdanau"])
def test_seq2seq_teacher_forcing_equals_step_decoding(cell, attention):
    model = Seq2Seq(Seq2SeqArgs(20, 25, cell=cell, embedding_size=8, hidden_size=16, attention=attention)).eval()
    src = torch.randint(4, 20, (3, 6))
    src_lengths = torch.tensor([6, 3, 1])
    tgt_in = torch.cat([torch.ones(3, 1, dtype=torch.long), torch.randint(4, 25, (3, 4))], 1)
    forced = torch.log_softmax(model(src, src_lengths, tgt_in), -1)
    start, state = model.start(src, src_lengths, bos_id=1)
    step = model.step_fn()
    for t in range(tgt_in.shape[1]):
        log_probs, state = step(tgt_in[:, t] if t else start, state)
        torch.testing.assert_close(log_probs, forced[:, t])


def test_seq2seq_masks_padding():
    model = Seq2Seq(Seq2SeqArgs(20, 25, embedding_size=8, hidden_size=16)).eval()
    src = torch.randint(4, 20, (2, 5))
    memory, mask, _ = model.encode(src, torch.tensor([5, 2]))
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    start, state = model.start(src, torch.tensor([5, 2]), 1)
    *_, attention = model.decode_step(start, *state)
    assert torch.all(attention[1, 2:] == 0)
    alone = model.decode_step(start[1:], *model.start(src[1:, :2], torch.tensor([2]), 1)[1])
    torch.testing.assert_close(alone[0], model.decode_step(start, *state)[0][1:])


def test_lstm_forget_gate_bias_starts_at_one():
    rnn = make_rnn("lstm", 4, 6, 2, 0.0)
    for name, param in rnn.named_parameters():
        if name.startswith("bias_ih"):
            assert param[6:12].tolist() == [1.0] * 6 and param[:6].abs().sum() == 0
        elif name.startswith("bias_hh"):
            assert param.abs().sum() == 0


def test_weight_tying_and_rebuild_from_args():
    model = LanguageModel(LMArgs(vocab_size=30, embedding_size=8, hidden_size=12, tie_weights=True))
    assert model.output.weight is model.embedding.weight
    again = build_model("lm", model.model_args())
    again.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="cell must be one of"):
        LanguageModel(LMArgs(vocab_size=5, cell="transformer"))
