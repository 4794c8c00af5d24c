"""The real Prometheus against a running seqserve: promtool accepts /metrics, Prometheus scrapes it, the
query API gives a seqserve series back, and every metric the dashboard queries is one the server exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest

from bench.services import free_port
from exporters.bundle import ExportOptions, export_run
from exporters.parity import ParitySettings
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc
from server.app import ServerThread
from server.config import ServerConfig

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "seqserve.json"
SMALL_EXPORT = ExportOptions(eval_limit=10, real_inputs=40,
                             parity=ParitySettings(greedy_inputs=5, beam_inputs=2, max_new_tokens=10))


@pytest.fixture(scope="module")
def server(tiny_runs, tmp_path_factory):
    repository = tmp_path_factory.mktemp("scrape-repository")
    export_run(tiny_runs["lstm", "lm"], repository, "tiny-lm", options=SMALL_EXPORT)
    export_run(tiny_runs["gru", "seq2seq"], repository, "tiny-g2p", options=SMALL_EXPORT)
    config = ServerConfig(repository=str(repository), port=0, metrics_port=0, poll_interval_seconds=0,
                          log_format="text")
    with ServerThread(config) as running:
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        stub = pb_grpc.SeqserveStub(channel)
        # Traffic of each kind, so the histograms and counters have samples.
        list(stub.Generate(pb.GenerateRequest(model="tiny-lm", prompt="the", options=pb.DecodingOptions(
            max_new_tokens=5))))
        stub.Translate(pb.TranslateRequest(model="tiny-g2p", sources=["abc"]))
        with pytest.raises(grpc.RpcError):
            stub.Translate(pb.TranslateRequest(model="no-such-model", sources=["abc"]))
        channel.close()
        yield running


def scrape(server) -> str:
    url = f"http://127.0.0.1:{server.app.metrics_port}/metrics"
    return urllib.request.urlopen(url, timeout=10).read().decode()


def test_promtool_accepts_the_metrics(server):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; `make setup-system` installs it)")
    result = subprocess.run([promtool, "check", "metrics"], input=scrape(server), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_metric_is_exported_by_the_running_server(server):
    exported = set(re.findall(r"^(seqserve_[a-z_]+)", scrape(server), flags=re.M))
    queried = set()
    for expr in re.findall(r'"expr":\s*"((?:[^"\\]|\\.)*)"', DASHBOARD.read_text()):
        for name in re.findall(r"seqserve_[a-z_]+", expr):
            queried.add(name)
    missing = sorted(name for name in queried if name not in exported)
    assert queried and not missing, f"dashboard queries metrics the server does not export: {missing}"


def test_real_prometheus_scrapes_and_answers(server, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (Debian package prometheus; `make setup-system` installs it)")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: seqserve\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.app.metrics_port}']\n")
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        query = urllib.parse.urlencode({"query": 'seqserve_requests_total{rpc="Translate"}'})
        url = f"http://127.0.0.1:{port}/api/v1/query?{query}"
        deadline, series = time.monotonic() + 60, []
        while time.monotonic() < deadline and not series:
            time.sleep(1)
            try:
                answer = json.loads(urllib.request.urlopen(url, timeout=5).read())
            except OSError:
                continue  # not listening yet
            series = answer["data"]["result"]
        assert series, "Prometheus never returned a seqserve series"
        codes = {s["metric"]["code"] for s in series}
        assert {"OK", "NOT_FOUND"} <= codes, codes
        assert all(s["metric"]["job"] == "seqserve" for s in series)
    finally:
        process.terminate()
        process.wait(timeout=30)
