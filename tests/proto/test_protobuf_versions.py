"""seqserve's generated code and server run on protobuf 6 (this environment: tritonclient[grpc] pins <7) and
on protobuf 7 (`make setup` puts it in .venv/protobuf7; a child process has it first on its path): the
same native Translate and Open Inference Protocol ModelInfer answers on both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import google.protobuf

REPO = Path(__file__).resolve().parents[2]
PROTOBUF7 = Path(sys.prefix) / "protobuf7"

# Starts a server on the repository's models and answers one native Translate and one ModelInfer (sent with
# seqserve.inference's own message classes over a plain channel), as JSON.
SCRIPT = r"""
import json, sys
import grpc
import google.protobuf
import seqserve.inference as oip
from seqserve.v1 import service_pb2 as pb, service_pb2_grpc as pb_grpc
from server.app import ServerThread
from server.config import ServerConfig

config = ServerConfig(repository="models", port=0, metrics_port=-1, poll_interval_seconds=0, log_level="warning")
with ServerThread(config) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
    translated = pb_grpc.SeqserveStub(channel).Translate(pb.TranslateRequest(model="g2p-en", sources=["hello"]))
    request = oip.ModelInferRequest(model_name="g2p-en")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hello")
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                request_serializer=oip.ModelInferRequest.SerializeToString,
                                response_deserializer=oip.ModelInferResponse.FromString)
    response = infer(request)
    print(json.dumps({"protobuf": google.protobuf.__version__, "native": translated.translations[0].hypotheses[0].text,
                      "inference": response.raw_output_contents[0][4:].decode()}))
"""


def _answers(extra_path: Path | None) -> dict:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_server_answers_alike_on_protobuf_6_and_7():
    assert PROTOBUF7.is_dir(), f"{PROTOBUF7} is missing: `make setup` installs protobuf 7 there"
    assert google.protobuf.__version__.startswith("6."), "this environment should hold tritonclient's protobuf 6"
    on_6, on_7 = _answers(None), _answers(PROTOBUF7)
    assert on_6["protobuf"].startswith("6.") and on_7["protobuf"].startswith("7.")
    assert on_6["native"] == on_6["inference"] == on_7["native"] == on_7["inference"] != ""
