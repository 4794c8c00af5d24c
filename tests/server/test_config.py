"""server/config.py: defaults < TOML file < SEQSERVE_* environment < flags; bad settings are named."""

from __future__ import annotations

import pytest

from server.config import SERVE_SESSION_STORE, ConfigError, ServerConfig, load_config


def test_defaults_are_valid_and_documented_values():
    config = load_config(env={})
    assert config == ServerConfig(session_store=SERVE_SESSION_STORE)
    assert config.repository == "models" and config.port == 50051 and config.metrics_port == 9464
    assert config.providers == ("CPUExecutionProvider",)


def test_file_then_environment_then_flags(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text('port = 6000\nmetrics_port = 6001\nproviders = ["CUDAExecutionProvider"]\n'
                    'drain_grace_seconds = 2\nlog_format = "text"\n')
    env = {"SEQSERVE_METRICS_PORT": "7001", "SEQSERVE_MAX_QUEUE": "5", "SEQSERVE_AUTH_TOKEN": "s3cret"}
    config = load_config(path, env=env, port=8000, host=None)
    assert config.port == 8000  # flag beats file
    assert config.metrics_port == 7001  # environment beats file
    assert config.max_queue == 5 and config.log_format == "text"
    assert config.providers == ("CUDAExecutionProvider",)
    assert config.drain_grace_seconds == 2.0 and isinstance(config.drain_grace_seconds, float)
    assert config.auth_token == "s3cret" and "s3cret" not in repr(config) and "s3cret" not in config.to_toml()


def test_prefix_cache_and_priorities_reach_the_engines_and_the_api():
    from server.app import make_registry
    from server.metrics import Metrics

    config = load_config(env={"SEQSERVE_PREFIX_CACHE_BYTES": "0", "SEQSERVE_PREFIX_CACHE_STRIDE": "32",
                              "SEQSERVE_MIN_PRIORITY": "-3", "SEQSERVE_MAX_PRIORITY": "7",
                              "SEQSERVE_PRIORITY_AGING_SECONDS": "0.5"})
    assert ServerConfig().prefix_cache_bytes == 128 * 1024 * 1024 and ServerConfig().prefix_cache_stride == 64
    engine = make_registry(config, Metrics()).config
    assert (engine.prefix_cache_bytes, engine.prefix_cache_stride, engine.limits.min_priority,
            engine.limits.max_priority, engine.priority_aging_seconds) == (0, 32, -3, 7, 0.5)
    # One limits object: the API edge validates against the very limits the engines were given.
    assert config.request_limits() == engine.limits


def test_config_file_from_environment(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('repository = "/srv/models"\n')
    assert load_config(env={"SEQSERVE_CONFIG": str(path)}).repository == "/srv/models"


def test_providers_from_a_comma_separated_variable():
    config = load_config(env={"SEQSERVE_PROVIDERS": "TensorrtExecutionProvider, CUDAExecutionProvider,"})
    assert config.providers == ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def test_round_trip_through_toml(tmp_path):
    config = ServerConfig(port=0, providers=("A", "B"), log_level="debug", poll_interval_seconds=0.5)
    path = tmp_path / "out.toml"
    path.write_text(config.to_toml())
    assert load_config(path, env={}) == config


@pytest.mark.parametrize(("source", "expected"), [
    ({"file": "prot = 1\n"}, "unknown setting 'prot'"),
    ({"file": 'port = "x"\n'}, "port in the config file"),
    ({"file": "port = [\n"}, "not valid TOML"),
    ({"env": {"SEQSERVE_PORTT": "1"}}, "unknown setting SEQSERVE_PORTT"),
    ({"env": {"SEQSERVE_PORT": "abc"}}, "port from the environment variable SEQSERVE_PORT must be int, got 'abc'"),
    ({"env": {"SEQSERVE_PORT": "70000"}}, "port must be in [0, 65535]"),
    ({"env": {"SEQSERVE_LOG_FORMAT": "xml"}}, "log_format must be one of json, text, got 'xml'"),
    ({"env": {"SEQSERVE_DEFAULT_MAX_NEW_TOKENS": "999"}}, "default_max_new_tokens must be in [1, max_new_tokens"),
    ({"env": {"SEQSERVE_GRAPH_OPTIMIZATION_LEVEL": "max"}}, "graph_optimization_level must be one of"),
    ({"env": {"SEQSERVE_PREFIX_CACHE_BYTES": "-1"}}, "prefix_cache_bytes must be >= 0 (0 = off), got -1"),
    ({"env": {"SEQSERVE_PREFIX_CACHE_BYTES": "1GiB"}}, "prefix_cache_bytes from the environment variable"),
    ({"env": {"SEQSERVE_PREFIX_CACHE_STRIDE": "0"}}, "prefix_cache_stride must be >= 1"),
    ({"env": {"SEQSERVE_MIN_PRIORITY": "1"}}, "min_priority must be <= 0 (0 is the default priority), got 1"),
    ({"file": "max_priority = -1\n"}, "max_priority must be >= 0"),
    ({"env": {"SEQSERVE_PRIORITY_AGING_SECONDS": "-2"}}, "priority_aging_seconds must be >= 0"),
])
def test_bad_settings_are_named(tmp_path, source, expected):
    path = None
    if "file" in source:
        path = tmp_path / "bad.toml"
        path.write_text(source["file"])
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=source.get("env", {}))
    assert expected in str(caught.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})


def test_session_options_reach_onnxruntime_form():
    from server.bundle import make_session_options

    options = ServerConfig(intra_op_threads=1, graph_optimization_level="basic").session_options
    assert make_session_options(options).intra_op_num_threads == 1


def test_the_clients_environment_does_not_stop_the_server():
    from server.config import load_config

    config = load_config(env={"SEQSERVE_TARGET": "h:1", "SEQSERVE_PORT": "50052"})
    assert config.port == 50052
