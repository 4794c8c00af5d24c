"""exporters/onnx_graphs.py: native recurrent ops, symbolic batch/time axes, padding-independent rows."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from exporters import ExportError
from exporters.onnx_graphs import check_recurrent_ops, export_graphs, graph_interface, op_type_counts
from exporters.parity import make_session
from training.models import LanguageModel, LMArgs, Seq2Seq, Seq2SeqArgs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CELLS = ("lstm", "gru", "rnn")
NATIVE = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def tiny_lm(cell: str, **kw) -> LanguageModel:
    torch.manual_seed(0)
    args = LMArgs(vocab_size=11, cell=cell, embedding_size=8, hidden_size=10, num_layers=2, **kw)
    return LanguageModel(args).eval()


def tiny_seq2seq(cell: str, **kw) -> Seq2Seq:
    torch.manual_seed(0)
    args = Seq2SeqArgs(source_vocab_size=13, target_vocab_size=9, cell=cell, embedding_size=8, hidden_size=10,
                       num_layers=2, **kw)
    return Seq2Seq(args).eval()


def run(session, **feed):
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: v.numpy() for k, v in feed.items()}), strict=True))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_recurrence_is_native_onnx_ops_not_loops(tmp_path, cell, kind):
    model = tiny_lm(cell) if kind == "lm" else tiny_seq2seq(cell)
    for graph in export_graphs(model, tmp_path):
        counts = op_type_counts(tmp_path / graph.file)
        assert counts[NATIVE[cell]] == 2, counts  # one fused op per layer (bidirectional encoder included)
        assert not {"Loop", "Scan"} & set(counts)
        check_recurrent_ops(tmp_path / graph.file, cell, layers=2)


def test_check_recurrent_ops_names_what_it_found(tmp_path):
    graph = export_graphs(tiny_lm("gru"), tmp_path)[0]
    with pytest.raises(ExportError, match="expected 3 GRU op.*found 2 GRU"):
        check_recurrent_ops(tmp_path / graph.file, "gru", layers=3)
    with pytest.raises(ExportError, match="expected 2 LSTM"):
        check_recurrent_ops(tmp_path / graph.file, "lstm", layers=2)


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_batch_and_time_axes_are_symbolic_on_inputs_and_outputs(tmp_path, kind):
    model = tiny_lm("lstm") if kind == "lm" else tiny_seq2seq("lstm")
    for graph in export_graphs(model, tmp_path):
        proto = onnx.load(str(tmp_path / graph.file))
        for value in [*proto.graph.input, *proto.graph.output]:
            dims = value.type.tensor_type.shape.dim
            assert dims[0].dim_param == "batch", (graph.file, value.name)
            if value.name in ("tokens", "log_probs") and kind == "lm":
                assert dims[1].dim_param == "time"
            if value.name in ("src", "memory", "mask", "attention"):
                assert dims[1].dim_param == "src_time", (graph.file, value.name)
        inputs, outputs = graph_interface(tmp_path / graph.file)
        assert list(inputs) == list(graph.inputs) and list(outputs) == list(graph.outputs)
        # ONNX Runtime sees the same thing: no axis frozen to the export example's size.
        session = make_session(tmp_path / graph.file)
        for arg in [*session.get_inputs(), *session.get_outputs()]:
            assert isinstance(arg.shape[0], str), (graph.file, arg.name, arg.shape)


@pytest.mark.parametrize("cell", CELLS)
def test_lm_step_runs_at_other_batch_and_time_sizes(tmp_path, cell):
    model = tiny_lm(cell)
    export_graphs(model, tmp_path)
    session = make_session(tmp_path / "step.onnx")
    names = ["h", "c"][: 2 if cell == "lstm" else 1]
    for batch, time in [(1, 1), (5, 2), (2, 40)]:  # the export example was batch 3, time 7
        tokens = torch.randint(0, 11, (batch, time))
        lengths = torch.randint(1, time + 1, (batch,))
        lengths[0] = time
        state = [torch.randn(batch, 2, 10) for _ in names]
        out = run(session, tokens=tokens, lengths=lengths, **dict(zip(names, state, strict=True)))
        assert out["log_probs"].shape == (batch, time, 11)
        with torch.no_grad():
            ref = model(tokens, lengths, *state)
        valid = (torch.arange(time)[None] < lengths[:, None]).numpy()
        np.testing.assert_allclose(out["log_probs"][valid], ref[0].numpy()[valid], atol=1e-5)
        for name, expected in zip(names, ref[1:], strict=True):
            np.testing.assert_allclose(out[f"{name}_out"], expected.numpy(), atol=1e-5)


def test_lm_padding_never_changes_another_row(tmp_path):
    model = tiny_lm("lstm")
    export_graphs(model, tmp_path)
    session = make_session(tmp_path / "step.onnx")
    rows = [[4, 5, 6, 7, 8, 9], [4], [10, 3, 5]]
    width = 9
    tokens = torch.randint(0, 11, (len(rows), width))  # garbage in the padding, on purpose
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    zeros = torch.zeros(len(rows), 2, 10)
    together = run(session, tokens=tokens, lengths=torch.tensor([len(r) for r in rows]), h=zeros, c=zeros)
    for i, row in enumerate(rows):
        alone = run(session, tokens=torch.tensor([row]), lengths=torch.tensor([len(row)]),
                    h=zeros[:1], c=zeros[:1])
        np.testing.assert_allclose(together["log_probs"][i, : len(row)], alone["log_probs"][0], atol=1e-6)
        for name in ("h_out", "c_out"):
            np.testing.assert_allclose(together[name][i], alone[name][0], atol=1e-6)


def decoder_feed(encoded: dict, state_names: list[str]) -> dict:
    """The decoder's first inputs from the encoder's outputs (h_out -> h, ..., memory, mask)."""
    feed = {n: torch.from_numpy(encoded[f"{n}_out"]) for n in state_names}
    return {**feed, "memory": torch.from_numpy(encoded["memory"]), "mask": torch.from_numpy(encoded["mask"])}


@pytest.mark.parametrize("cell", CELLS)
def test_seq2seq_padding_never_changes_another_row(tmp_path, cell):
    model = tiny_seq2seq(cell)
    graphs = export_graphs(model, tmp_path)
    encoder, decoder = (make_session(tmp_path / g.file) for g in graphs)
    state_names = [n for n in graphs[1].state_inputs]
    sources = [[5, 6, 7, 8, 9, 10, 11], [4], [12, 5, 6]]
    width = 10  # longer than every source: all rows padded, with garbage
    src = torch.randint(0, 13, (len(sources), width))
    for i, s in enumerate(sources):
        src[i, : len(s)] = torch.tensor(s)
    enc = run(encoder, src=src, src_lengths=torch.tensor([len(s) for s in sources]))
    prev = torch.tensor([1, 1, 1])
    dec = run(decoder, prev_token=prev, **decoder_feed(enc, state_names))
    for i, s in enumerate(sources):
        alone = run(encoder, src=torch.tensor([s]), src_lengths=torch.tensor([len(s)]))
        np.testing.assert_allclose(enc["memory"][i, : len(s)], alone["memory"][0], atol=1e-6)
        assert (enc["mask"][i] == (np.arange(width) < len(s))).all()
        for n in state_names:
            np.testing.assert_allclose(enc[f"{n}_out"][i], alone[f"{n}_out"][0], atol=1e-6)
        step = run(decoder, prev_token=prev[:1], **decoder_feed(alone, state_names))
        np.testing.assert_allclose(dec["log_probs"][i], step["log_probs"][0], atol=1e-6)
        np.testing.assert_allclose(dec["attention"][i, : len(s)], step["attention"][0], atol=1e-6)
        assert np.abs(dec["attention"][i, len(s):]).max(initial=0.0) < 1e-12  # no weight on padding


def test_unused_input_feed_stays_in_the_interface(tmp_path):
    """Without input feeding the decoder never reads input_feed; the graph still takes it, like all others."""
    graphs = export_graphs(tiny_seq2seq("gru", input_feeding=False, attention="bahdanau"), tmp_path)
    decoder = graphs[1]
    assert [t.name for t in decoder.inputs] == ["prev_token", "h", "input_feed", "memory", "mask"]
    assert list(decoder.state_inputs) == ["h", "input_feed"]
    assert list(decoder.state_outputs) == ["h_out", "input_feed_out"]
    session = make_session(tmp_path / decoder.file)
    assert [i.name for i in session.get_inputs()] == [t.name for t in decoder.inputs]


def test_tied_lm_and_interface_names(tmp_path):
    graph = export_graphs(tiny_lm("lstm", tie_weights=True), tmp_path)[0]
    assert graph.role == "step" and graph.variant == "fp32" and graph.file == "step.onnx"
    assert [t.name for t in graph.inputs] == ["tokens", "lengths", "h", "c"]
    assert [t.name for t in graph.outputs] == ["log_probs", "h_out", "c_out"]
    shapes = [list(t.shape) for t in graph.outputs]
    assert shapes == [["batch", "time", "11"], ["batch", "2", "10"], ["batch", "2", "10"]]
    assert [t.dtype for t in graph.inputs] == ["int64", "int64", "float32", "float32"]


@pytest.mark.parametrize("cell", CELLS)
def test_lm_prefill_graph_returns_step_states_and_the_last_positions_log_probs(tmp_path, cell):
    model = tiny_lm(cell)
    step, prefill = export_graphs(model, tmp_path)
    assert (prefill.role, prefill.variant, prefill.file) == ("prefill", "fp32", "prefill.onnx")
    assert list(prefill.inputs) == list(step.inputs) and list(prefill.state_inputs) == list(step.state_inputs)
    assert list(prefill.outputs)[:-1] == list(step.outputs)[1:]  # step's states, then:
    assert (prefill.outputs[-1].name, list(prefill.outputs[-1].shape)) == ("last_log_probs", ["batch", "11"])
    assert list(prefill.state_outputs) == list(step.state_outputs)
    check_recurrent_ops(tmp_path / prefill.file, cell, layers=2)
    assert op_type_counts(tmp_path / prefill.file)["LogSoftmax"] == 1
    proto = onnx.load(str(tmp_path / prefill.file))
    for value in [*proto.graph.input, *proto.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    assert proto.graph.input[0].type.tensor_type.shape.dim[1].dim_param == "time"
    session = make_session(tmp_path / prefill.file)
    names = list(prefill.state_inputs)
    for batch, time in [(1, 1), (5, 2), (2, 40)]:  # the export example was batch 3, time 7
        tokens = torch.randint(0, 11, (batch, time))
        lengths = torch.randint(1, time + 1, (batch,))
        lengths[0] = time
        state = [torch.randn(batch, 2, 10) for _ in names]
        out = run(session, tokens=tokens, lengths=lengths, **dict(zip(names, state, strict=True)))
        assert list(out) == [*prefill.state_outputs, "last_log_probs"]
        with torch.no_grad():
            ref = model(tokens, lengths, *state)
        for name, expected in zip(names, ref[1:], strict=True):
            np.testing.assert_allclose(out[f"{name}_out"], expected.numpy(), atol=1e-5)
        # Row b's log-probs after its own last token (position lengths[b] - 1), not after the padding.
        last = ref[0][torch.arange(batch), lengths - 1]
        np.testing.assert_allclose(out["last_log_probs"], last.numpy(), atol=1e-5)
