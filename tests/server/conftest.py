"""Fixtures shared by the server tests that talk to a real server over gRPC."""

from __future__ import annotations

import grpc
import pytest

from seqserve.v1 import service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def stub(server):
    """A blocking stub on the module's `server` (a running `server.app.ServerThread`)."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.SeqserveStub(channel)


@pytest.fixture(scope="session")
def export_tiny_models(tiny_runs):
    """export(repository, options=None, lm_names=("tiny-lm",)): the tiny LSTM LM under each of `lm_names`
    and tiny-g2p (the tiny GRU translator) into `repository`, exported on one torch thread."""
    return lambda repository, options=None, lm_names=("tiny-lm",): _export_tiny_models(tiny_runs, repository,
                                                                                        options, lm_names)


def _export_tiny_models(tiny_runs, repository, options, lm_names) -> None:
    import torch

    from exporters.bundle import ExportOptions, export_run
    from exporters.parity import ParitySettings

    options = options or ExportOptions(eval_limit=10, real_inputs=50,
                                       parity=ParitySettings(greedy_inputs=5, beam_inputs=2, max_new_tokens=10))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in lm_names:
            export_run(tiny_runs["lstm", "lm"], repository, name, options=options)
        export_run(tiny_runs["gru", "seq2seq"], repository, "tiny-g2p", options=options)
    finally:
        torch.set_num_threads(before)
