"""Bundles the engine's tests build themselves."""

from __future__ import annotations

import onnxruntime
import pytest
import torch

from exporters.bundle import TOKENIZER_FILES, model_sizes, special_tokens
from exporters.onnx_graphs import OPSET, export_graphs
from seqserve.bundle import sha256_file, write_manifest
from seqserve.v1.manifest_pb2 import Manifest, ModelKind
from server.bundle import load_bundle
from training.models import LanguageModel, LMArgs
from training.tokenizer import train_tokenizer

CORPUS = ["héllo wörld, the cat sat on the mat", "日本語 text with ünïcode — and emoji 🙂🙃",
          "AA B K D EH F G HH", "stop here STOP there"] * 20


def build_random_lm(directory, kind: str):
    """An untrained LSTM LM over a `kind` tokenizer: its tokens are close to random, so generations
    split characters, emit special tokens and run into invalid UTF-8 (byte-level BPE)."""
    tokenizer = train_tokenizer(kind, CORPUS, vocab_size=300 if kind == "bpe" else None)
    torch.manual_seed(0)
    model = LanguageModel(LMArgs(vocab_size=tokenizer.get_vocab_size(), cell="lstm", embedding_size=16,
                                 hidden_size=32, num_layers=1, dropout=0.0)).eval()
    bundle = directory / f"random-{kind}" / "1"
    bundle.mkdir(parents=True)
    graphs = export_graphs(model, bundle)
    tokenizer.save(str(bundle / TOKENIZER_FILES["text"]))
    manifest = Manifest(schema_version=1, name=f"random-{kind}", version=1, kind=ModelKind.MODEL_KIND_LM,
                        cell="lstm", sizes=model_sizes(model), special_tokens=special_tokens({"text": tokenizer}),
                        tokenizers={"text": TOKENIZER_FILES["text"]}, graphs=graphs, opset=OPSET,
                        onnxruntime_version=onnxruntime.__version__, torch_version=torch.__version__)
    manifest.sha256.update({p.name: sha256_file(p) for p in sorted(bundle.iterdir())})
    write_manifest(manifest, bundle / "manifest.json")
    return load_bundle(bundle, session_options={"intra_op_num_threads": 1, "inter_op_num_threads": 1})


@pytest.fixture(scope="session")
def random_lm_bundle():
    """`random_lm_bundle(directory, kind)`: a loaded untrained LSTM LM over a `kind` tokenizer."""
    return build_random_lm
