"""Every Prometheus metric seqserve exports (the table in docs/operations.md, "Metrics"), defined once.

Prefix `seqserve_`, base units, `_total` on counters, a `model` label (the model's name; versions of
one model add up) wherever a model is involved. Pass a `CollectorRegistry` to keep tests apart; the
app serves `Metrics.registry` on /metrics.

Who records what: the engine records batch, queue, token, row and finish figures and `model_info`;
the gRPC layer records `requests_total`, `request_duration_seconds`, `time_to_first_token_seconds` and
`inter_token_latency_seconds` (use `model=""` for RPCs about no model, such as ListModels); sessions
record the `session*` metrics.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "seqserve"
# Several processes of one server (API processes beside an engine process) keep their values in files that
# the supervisor's /metrics adds up (prometheus_client's multiprocess mode): counters and histograms sum, and
# each gauge is the sum over the live processes.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

# Buckets in seconds (base units) or rows, each fitted to what it measures.
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
STEP_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
MASK_BUCKETS = (0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)
CONSTRAINT_KINDS = ("regex", "choice", "json_schema", "grammar")
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """The metric families; `for_model(name)` gives the engine its label-bound children."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        def name(suffix: str) -> str:
            return f"{PREFIX}_{suffix}"

        # gRPC layer
        self.requests_total = Counter(name("requests_total"), "RPCs handled, by method and status code.",
                                      ["model", "rpc", "code"], registry=r)
        self.request_duration_seconds = Histogram(
            name("request_duration_seconds"), "Time from an RPC's arrival to its last message.",
            ["model", "rpc"], buckets=REQUEST_BUCKETS, registry=r)
        self.time_to_first_token_seconds = Histogram(
            name("time_to_first_token_seconds"), "Time from a streaming request's arrival to its first token.",
            ["model"], buckets=TOKEN_LATENCY_BUCKETS + (5.0, 10.0, 30.0), registry=r)
        self.inter_token_latency_seconds = Histogram(
            name("inter_token_latency_seconds"), "Time between consecutive tokens of one stream.",
            ["model"], buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        # engine
        self.queue_wait_seconds = Histogram(
            name("queue_wait_seconds"), "Time a request waited for rows before its prefill, by its priority.",
            ["model", "priority"], buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.queue_depth = Gauge(name("queue_depth"), "Requests waiting for rows.", ["model"], registry=r,
                                 multiprocess_mode="livesum")
        self.batch_size = Histogram(name("batch_size"), "Rows advanced by one decode step.", ["model"],
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.decode_step_duration_seconds = Histogram(
            name("decode_step_duration_seconds"), "ONNX Runtime time of one batched decode step.",
            ["model"], buckets=STEP_BUCKETS, registry=r)
        self.prompt_tokens_total = Counter(name("prompt_tokens_total"),
                                           "Prompt, source and fed tokens prefilled or encoded.", ["model"],
                                           registry=r)
        self.prefill_tokens_total = Counter(
            name("prefill_tokens_total"),
            "Prompt, source and fed tokens the prefill or encoder computed (prefix cache hits not included).",
            ["model"], registry=r)
        self.generated_tokens_total = Counter(name("generated_tokens_total"),
                                              "Tokens generated and returned (<eos> excluded).", ["model"],
                                              registry=r)
        self.finished_total = Counter(
            name("finished_total"),
            "Requests that ended, by reason (eos, length, stop, cancelled, deadline, error).",
            ["model", "reason"], registry=r)
        self.active_rows = Gauge(name("active_rows"), "Batch rows in use (a beam request uses beam_size).",
                                 ["model"], registry=r, multiprocess_mode="livesum")
        self.preemptions_total = Counter(
            name("preemptions_total"), "Running requests parked so that a higher-priority request could run.",
            ["model"], registry=r)
        self.parked_rows = Gauge(name("parked_rows"), "Batch rows parked by preemption, waiting to resume.",
                                 ["model"], registry=r, multiprocess_mode="livesum")
        # prefix cache (server.engine.prefix_cache), per model; versions of one model add up
        self.prefix_cache_hit_tokens_total = Counter(
            name("prefix_cache_hit_tokens_total"), "Prompt tokens not computed because the prefix cache held "
            "the state after them.", ["model"], registry=r)
        self.prefix_cache_lookups_total = Counter(
            name("prefix_cache_lookups_total"), "Prefix cache lookups, by result (hit, miss).",
            ["model", "result"], registry=r)
        self.prefix_cache_bytes = Gauge(name("prefix_cache_bytes"), "Bytes the prefix cache holds.", ["model"],
                                        registry=r, multiprocess_mode="livesum")
        self.prefix_cache_evictions_total = Counter(
            name("prefix_cache_evictions_total"), "States the prefix cache dropped to stay within its bytes.",
            ["model"], registry=r)
        self.model_info = Gauge(name("model_info"),
                                "1 for every loaded model version, with the execution provider it obtained.",
                                ["model", "version", "cell", "provider"], registry=r, multiprocess_mode="livesum")
        self.model_load_duration_seconds = Histogram(
            name("model_load_duration_seconds"), "Time to verify and open a bundle.", ["model"],
            buckets=LOAD_BUCKETS, registry=r)
        self.constrained_requests_total = Counter(
            name("constrained_requests_total"), "Requests admitted with a constraint on their output, by kind.",
            ["model", "kind"], registry=r)
        self.constraint_mask_seconds = Histogram(
            name("constraint_mask_seconds"),
            "Time one step spent working out the allowed tokens of its constrained rows (steps with some).",
            ["model"], buckets=MASK_BUCKETS, registry=r)
        # sessions
        self.sessions_active = Gauge(name("sessions_active"), "Open sessions.", ["model"], registry=r,
                                     multiprocess_mode="livesum")
        self.sessions_evicted_total = Counter(name("sessions_evicted_total"),
                                              "Sessions closed by the server, by reason.", ["model", "reason"],
                                              registry=r)
        self.session_state_bytes = Gauge(name("session_state_bytes"), "Bytes of parked session state.",
                                         ["model"], registry=r, multiprocess_mode="livesum")
        self.session_store_seconds = Histogram(
            name("session_store_seconds"), "Time of one session store call (a write includes its commit).",
            ["op"], buckets=STORE_BUCKETS, registry=r)
        self.session_store_errors_total = Counter(
            name("session_store_errors_total"), "Session store calls that failed (unreachable, unwritable), by op.",
            ["op"], registry=r)

    def for_model(self, model: str) -> ModelMetrics:
        return ModelMetrics(self, model)


SESSION_EVICTION_REASONS = ("expired", "evicted", "model_removed")



class ModelMetrics:
    """The engine's metrics bound to one model label once, so a step never looks a label up."""

    def __init__(self, metrics: Metrics, model: str):
        self.metrics = metrics
        self.model = model
        self._queue_wait: dict[int, object] = {}
        self.queue_depth = metrics.queue_depth.labels(model=model)
        self.batch_size = metrics.batch_size.labels(model=model)
        self.decode_step_duration_seconds = metrics.decode_step_duration_seconds.labels(model=model)
        self.prompt_tokens_total = metrics.prompt_tokens_total.labels(model=model)
        self.generated_tokens_total = metrics.generated_tokens_total.labels(model=model)
        self.prefill_tokens_total = metrics.prefill_tokens_total.labels(model=model)
        self.active_rows = metrics.active_rows.labels(model=model)
        self.preemptions_total = metrics.preemptions_total.labels(model=model)
        self.parked_rows = metrics.parked_rows.labels(model=model)
        self.prefix_cache_hit_tokens_total = metrics.prefix_cache_hit_tokens_total.labels(model=model)
        self.prefix_cache_hits = metrics.prefix_cache_lookups_total.labels(model=model, result="hit")
        self.prefix_cache_misses = metrics.prefix_cache_lookups_total.labels(model=model, result="miss")
        self.prefix_cache_bytes = metrics.prefix_cache_bytes.labels(model=model)
        self.prefix_cache_evictions_total = metrics.prefix_cache_evictions_total.labels(model=model)
        self.model_load_duration_seconds = metrics.model_load_duration_seconds.labels(model=model)
        self._finished: dict[str, object] = {}
        self.constraint_mask_seconds = metrics.constraint_mask_seconds.labels(model=model)
        self._constrained = {kind: metrics.constrained_requests_total.labels(model=model, kind=kind)
                             for kind in CONSTRAINT_KINDS}
        # Series that appear only on some traffic (a second chunk, a session) exist from the model's load
        # on, so dashboards show 0 rather than "no data" and a first scrape already lists every metric.
        metrics.time_to_first_token_seconds.labels(model=model)
        metrics.inter_token_latency_seconds.labels(model=model)
        metrics.sessions_active.labels(model=model)
        metrics.session_state_bytes.labels(model=model)
        self.queue_wait(0)
        for reason in SESSION_EVICTION_REASONS:
            metrics.sessions_evicted_total.labels(model=model, reason=reason)

    def queue_wait(self, priority: int):
        """The queue wait histogram of requests of `priority`."""
        child = self._queue_wait.get(priority)
        if child is None:
            child = self._queue_wait[priority] = self.metrics.queue_wait_seconds.labels(model=self.model,
                                                                                        priority=str(priority))
        return child

    def finished(self, reason: str) -> None:
        child = self._finished.get(reason)
        if child is None:
            child = self._finished[reason] = self.metrics.finished_total.labels(model=self.model, reason=reason)
        child.inc()

    def count_constraints(self, kinds: list[str], mask_seconds: float) -> None:
        """A step admitted requests with constraints of `kinds` and spent `mask_seconds` on masks."""
        for kind in kinds:
            self._constrained[kind].inc()
        if mask_seconds:
            self.constraint_mask_seconds.observe(mask_seconds)

    def set_info(self, version: int, cell: str, provider: str) -> None:
        self.metrics.model_info.labels(model=self.model, version=str(version), cell=cell, provider=provider).set(1)

    def clear_info(self, version: int, cell: str, provider: str) -> None:
        labels = (self.model, str(version), cell, provider)
        if MULTIPROCESS:  # a series cannot be removed from the processes' shared files: it reads 0 from now on
            self.metrics.model_info.labels(*labels).set(0)
            return
        try:
            self.metrics.model_info.remove(*labels)
        except KeyError:
            pass


def serve_metrics_http(registry: CollectorRegistry, port: int, host: str, *, tls_cert_file: str = "",
                       tls_key_file: str = "", tls_client_ca_file: str = ""):
    """/metrics over HTTP (HTTPS with a certificate; a client CA makes it mutual) on a thread of its own:
    (the server, its bound port)."""
    tls = {}
    if tls_cert_file:
        tls = dict(certfile=tls_cert_file, keyfile=tls_key_file, client_cafile=tls_client_ca_file or None,
                   client_auth_required=bool(tls_client_ca_file))
    server, _ = start_http_server(port, host, registry=registry, **tls)
    return server, server.server_port
