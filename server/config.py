"""The server's configuration: one dataclass, loaded from defaults, a TOML file, `SEQSERVE_*` variables, flags.

Precedence, lowest first: the defaults below, the TOML file (`--config FILE`, or `SEQSERVE_CONFIG`), the
environment (`SEQSERVE_<FIELD>` in upper case, e.g. `SEQSERVE_PORT=50052`, `SEQSERVE_PROVIDERS=CUDA
ExecutionProvider,CPUExecutionProvider`), then command-line flags. The TOML file is flat: its keys are
the field names below. An unknown key or a value of the wrong type is refused with a message naming it,
so a misspelt setting never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from server.decoding.limits import RequestLimits
from server.decoding.matching import ConstraintSettings

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli is the same parser under its old name
    import tomli as tomllib  # type: ignore[no-redef]

ENV_PREFIX = "SEQSERVE_"
# Variables of the same prefix that belong to other programs (`seqserve client` reads these), so a shell
# that exports them can still start the server.
FOREIGN_ENV = frozenset({"SEQSERVE_CONFIG", "SEQSERVE_TARGET"})
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
# The session store of `seqserve serve` unless one is set: durable, embedded, relative to the working directory.
SERVE_SESSION_STORE = "sqlite:state/sessions.db"


class ConfigError(ValueError):
    """A setting is unknown or out of range; the message names the setting, its source and value."""


@dataclass(frozen=True)
class ServerConfig:
    """Every setting of `seqserve serve`, with its default and what it does."""

    # --- where the models are, and where the server listens
    repository: str = "models"  # model repository (models/NAME/VERSION/); relative to the working directory
    host: str = "127.0.0.1"  # gRPC and /metrics bind address; "0.0.0.0" in a container
    port: int = 50051  # gRPC port; 0 = a free port, reported in the "serving" log line
    metrics_port: int = 9464  # Prometheus /metrics HTTP port; 0 = a free port; -1 = no /metrics
    # --- ONNX Runtime
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # execution providers, most preferred first
    variant: str = "fp32"  # graph variant to serve: fp32 | fp16 | int8
    intra_op_threads: int = 0  # threads inside one operator; 0 = cores - 1 (one core stays for the engine loop)
    inter_op_threads: int = 0  # threads across operators; 0 = ONNX Runtime decides
    graph_optimization_level: str = "all"  # disable | basic | extended | all
    ort_spinning: bool = False  # let idle ONNX Runtime threads spin (lower latency, but they take CPU from Python)
    # --- engine limits (per loaded model)
    max_rows_per_step: int = 256  # batch rows (requests x beams) advanced by one decode step
    max_queue: int = 1024  # requests waiting for rows; more are refused with RESOURCE_EXHAUSTED
    max_input_tokens: int = 512  # prompt / source tokens; longer inputs are INVALID_ARGUMENT
    max_new_tokens: int = 512  # the most a request may ask for
    default_max_new_tokens: int = 64  # what a request that leaves max_new_tokens at 0 gets
    max_beam_size: int = 16  # the widest beam a request may ask for
    default_beam_size: int = 4  # what a beam request that leaves beam_size at 0 gets
    max_sources: int = 64  # source texts in one Translate request
    # --- constrained decoding (DecodingOptions.constraint)
    constraint_max_chars: int = 65_536  # characters of one constraint (a regex, a schema, all choices together)
    constraint_compile_seconds: float = 2.0  # longer to compile: INVALID_ARGUMENT (compiles run off the event loop)
    constraint_cache_entries: int = 256  # compiled constraints kept per model vocabulary and process (LRU)
    constraint_mask_ms: float = 5.0  # a constraint whose next tokens take longer to work out is refused
    # bytes of prompt-prefix states each model version keeps for reuse (token-exact; outputs never change);
    # 0 = no prefix cache
    prefix_cache_bytes: int = 128 * 1024 * 1024
    prefix_cache_stride: int = 64  # a long prompt's state is also kept every this many tokens
    # --- priorities (higher is sooner; a waiting request may park running ones of a lower priority)
    min_priority: int = -10  # the lowest priority a request may ask for
    max_priority: int = 10  # the highest; 0 is the default and must lie in between
    priority_aging_seconds: float = 5.0  # a waiting request rises one level per this many seconds; 0 = never
    # --- sessions (all models together)
    max_sessions: int = 10_000  # open sessions; at the limit, the least recently used idle one is evicted
    session_ttl_seconds: int = 600  # idle time after which a session expires, when CreateSession asks for none
    max_session_ttl_seconds: int = 86_400  # the longest idle TTL CreateSession / ForkSession may ask for
    # where sessions live: memory | sqlite:PATH | redis://HOST:PORT[/DB]. `seqserve serve` (load_config)
    # defaults to SERVE_SESSION_STORE; a ServerConfig built in code (embedding, tests) keeps them in memory
    session_store: str = "memory"
    session_signing_key: str = field(default="", repr=False)  # when set, exported sessions carry an HMAC of it
    # --- gRPC transport
    max_receive_message_bytes: int = 4 * 1024 * 1024  # larger requests get RESOURCE_EXHAUSTED
    auth_token: str = field(default="", repr=False)  # when set, Seqserve RPCs need "authorization: Bearer <it>"
    auth_token_file: str = ""  # more accepted tokens, one per line; reread when it changes (rotation)
    tls_cert_file: str = ""  # PEM certificate chain: with tls_key_file, gRPC is served over TLS only
    tls_key_file: str = ""  # PEM private key of tls_cert_file
    tls_client_ca_file: str = ""  # PEM CA bundle: clients must present a certificate it signed (mutual TLS)
    metrics_tls: bool = False  # serve /metrics over HTTPS with the same certificate (and client CA)
    # --- processes and the wire
    # gRPC front-end processes sharing the port beside one engine process (models, sessions, store); each holds
    # TLS, auth, both APIs, tokenization and detokenization. 0 = chosen from the cores (`api_processes_for`);
    # 1 = one process does everything. Only `seqserve serve` reads it (an embedded App is one process).
    api_processes: int = 0
    # 0: a stream sends as soon as it can, the tokens ready together in one message; > 0: at most one message
    # per stream per interval (the tokens of the interval together; a stream's last message is never held)
    stream_interval_ms: float = 0.0
    # --- lifecycle
    poll_interval_seconds: float = 5.0  # rescan the repository for new versions this often; 0 = never
    drain_grace_seconds: float = 30.0  # on SIGTERM, in-flight requests get this long to finish
    # --- logs
    log_format: str = "json"  # json (one object per line) | text
    log_level: str = "info"  # debug | info | warning | error

    def __post_init__(self):
        if isinstance(self.providers, (list, str)):
            object.__setattr__(self, "providers", _split_list(self.providers))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first setting outside its range."""
        _check(bool(self.repository), "repository", self.repository, "a directory path")
        _check(bool(self.host), "host", self.host, "a host name or address")
        _check(0 <= self.port <= 65535, "port", self.port, "in [0, 65535] (0 = a free port)")
        _check(-1 <= self.metrics_port <= 65535, "metrics_port", self.metrics_port,
               "in [-1, 65535] (0 = a free port, -1 = off)")
        _check(bool(self.providers) and all(self.providers), "providers", self.providers,
               "a non-empty list of ONNX Runtime execution provider names")
        _check(self.variant in ("fp32", "fp16", "int8"), "variant", self.variant, "one of fp32, fp16, int8")
        for name in ("intra_op_threads", "inter_op_threads"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0 (0 = ONNX Runtime decides)")
        _check(self.graph_optimization_level in OPTIMIZATION_LEVELS, "graph_optimization_level",
               self.graph_optimization_level, "one of " + ", ".join(OPTIMIZATION_LEVELS))
        for name in ("max_rows_per_step", "max_queue", "max_input_tokens", "max_new_tokens", "max_beam_size",
                     "max_sources", "max_receive_message_bytes", "max_sessions", "constraint_max_chars",
                     "constraint_cache_entries"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        _check(self.prefix_cache_bytes >= 0, "prefix_cache_bytes", self.prefix_cache_bytes, ">= 0 (0 = off)")
        _check(self.prefix_cache_stride >= 1, "prefix_cache_stride", self.prefix_cache_stride, ">= 1")
        _check(self.min_priority <= 0, "min_priority", self.min_priority, "<= 0 (0 is the default priority)")
        _check(self.max_priority >= 0, "max_priority", self.max_priority, ">= 0 (0 is the default priority)")
        _check(self.priority_aging_seconds >= 0, "priority_aging_seconds", self.priority_aging_seconds,
               ">= 0 (0 = no aging)")
        _check(1 <= self.default_max_new_tokens <= self.max_new_tokens, "default_max_new_tokens",
               self.default_max_new_tokens, f"in [1, max_new_tokens={self.max_new_tokens}]")
        _check(1 <= self.default_beam_size <= self.max_beam_size, "default_beam_size", self.default_beam_size,
               f"in [1, max_beam_size={self.max_beam_size}]")
        _check(self.max_beam_size <= self.max_rows_per_step, "max_beam_size", self.max_beam_size,
               f"at most max_rows_per_step={self.max_rows_per_step} (a beam request needs all its rows)")
        _check(1 <= self.max_session_ttl_seconds <= 2**31 - 1, "max_session_ttl_seconds", self.max_session_ttl_seconds,
               "in [1, 2147483647] seconds")
        _check(1 <= self.session_ttl_seconds <= self.max_session_ttl_seconds, "session_ttl_seconds",
               self.session_ttl_seconds, f"in [1, max_session_ttl_seconds={self.max_session_ttl_seconds}]")
        _check(bool(self.tls_cert_file) == bool(self.tls_key_file), "tls_key_file", self.tls_key_file,
               "set together with tls_cert_file (both or neither)")
        _check(not self.tls_client_ca_file or bool(self.tls_cert_file), "tls_client_ca_file",
               self.tls_client_ca_file, "unset unless tls_cert_file and tls_key_file are set (mutual TLS is TLS)")
        _check(not self.metrics_tls or bool(self.tls_cert_file), "metrics_tls", self.metrics_tls,
               "false unless tls_cert_file and tls_key_file are set")
        _check(self.session_store == "memory" or (self.session_store.startswith("sqlite:")
                                                   and len(self.session_store) > len("sqlite:"))
               or self.session_store.startswith(("redis://", "rediss://", "unix://")), "session_store",
               self.session_store, "memory, sqlite:PATH or redis://HOST:PORT[/DB]")
        _check(0 <= self.api_processes <= MAX_API_PROCESSES, "api_processes", self.api_processes,
               f"in [0, {MAX_API_PROCESSES}] (0 = chosen from the cores, 1 = one process)")
        _check(0 <= self.stream_interval_ms <= 60_000, "stream_interval_ms", self.stream_interval_ms,
               "in [0, 60000] milliseconds (0 = send as soon as a stream can)")
        for name in ("constraint_compile_seconds", "constraint_mask_ms"):
            _check(getattr(self, name) > 0, name, getattr(self, name), "> 0")
        _check(self.poll_interval_seconds >= 0, "poll_interval_seconds", self.poll_interval_seconds,
               ">= 0 (0 = never)")
        _check(self.drain_grace_seconds >= 0, "drain_grace_seconds", self.drain_grace_seconds, ">= 0")
        _check(self.log_format in LOG_FORMATS, "log_format", self.log_format, "one of " + ", ".join(LOG_FORMATS))
        _check(self.log_level in LOG_LEVELS, "log_level", self.log_level, "one of " + ", ".join(LOG_LEVELS))

    def metrics_tls_files(self) -> dict[str, str]:
        """The certificate files /metrics is served with (none unless `metrics_tls`)."""
        if not self.metrics_tls:
            return {}
        return {"tls_cert_file": self.tls_cert_file, "tls_key_file": self.tls_key_file,
                "tls_client_ca_file": self.tls_client_ca_file}

    def resolved_api_processes(self) -> int:
        """`api_processes`, or when it is 0 the count for this machine's cores (`api_processes_for`)."""
        return self.api_processes or api_processes_for(usable_cores())

    def request_limits(self) -> RequestLimits:
        """The limits requests are validated against, by the API edge and the engine alike."""
        return RequestLimits(max_new_tokens=self.max_new_tokens, default_max_new_tokens=self.default_max_new_tokens,
                             max_beam_size=self.max_beam_size, default_beam_size=self.default_beam_size,
                             max_sources=self.max_sources, max_input_tokens=self.max_input_tokens,
                             constraints=self.constraint_settings(), min_priority=self.min_priority,
                             max_priority=self.max_priority)

    def constraint_settings(self) -> ConstraintSettings:
        """What compiling and following a constraint may cost (every process compiles through its own cache)."""
        return ConstraintSettings(max_chars=self.constraint_max_chars, compile_seconds=self.constraint_compile_seconds,
                                  cache_entries=self.constraint_cache_entries, mask_ms=self.constraint_mask_ms)

    @property
    def repository_path(self) -> Path:
        return Path(self.repository).expanduser()

    @property
    def session_options(self) -> dict[str, Any]:
        """ONNX Runtime session options in the form `server.bundle.make_session_options` takes."""
        # ONNX Runtime's own default (every core, spinning) makes its threads fight the engine's Python
        # thread for the CPU: measured in bench/RESULTS.md, one core left free is faster on 2 cores.
        intra = self.intra_op_threads or max(1, (os.cpu_count() or 2) - 1)
        return {"intra_op_num_threads": intra, "inter_op_num_threads": self.inter_op_threads,
                "graph_optimization_level": self.graph_optimization_level, "allow_spinning": self.ort_spinning}

    def to_toml(self, *, redact: bool = True) -> str:
        """The effective settings as TOML that `load_config` reads back (the auth token hidden if `redact`)."""
        lines = []
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name in ("auth_token", "session_signing_key") and value and redact:
                value = "<redacted>"
            lines.append(f"{spec.name} = {_toml_value(value)}\n")
        return "".join(lines)

    def replace(self, **changes: Any) -> ServerConfig:
        """A copy with `changes` applied (None values are ignored, so unset flags change nothing)."""
        changes = {key: value for key, value in changes.items() if value is not None}
        return dataclasses.replace(self, **_coerce_all(changes, "override")) if changes else self


MAX_API_PROCESSES = 64


def api_processes_for(cores: int) -> int:
    """API processes for a machine of `cores` cores: one process alone on a single core (a second would only
    add the IPC); else half the cores, at least 2 and at most 8. The engine process needs a core or two of
    its own (its step loop, ONNX Runtime's threads); each API process carries tens of thousands of messages
    per second (docs/architecture.md, "Processes")."""
    if cores <= 1:
        return 1
    return min(max(2, cores // 2), 8)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset and cpusets (containers' --cpuset-cpus)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
                **overrides: Any) -> ServerConfig:
    """Defaults, then the TOML file at `path` (or `$SEQSERVE_CONFIG`), then `SEQSERVE_*` variables, then
    `overrides` (flags; None means "not given")."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {"session_store": SERVE_SESSION_STORE}
    path = path or env.get(ENV_PREFIX + "CONFIG") or None
    if path is not None:
        values.update(_coerce_all(_read_toml(Path(path)), f"config file {path}"))
    values.update(_from_env(env))
    values.update(_coerce_all({k: v for k, v in overrides.items() if v is not None}, "command line"))
    return ServerConfig(**values)


_FIELDS = {spec.name: spec for spec in fields(ServerConfig)}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from error
    return data


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for key, text in env.items():
        if not key.startswith(ENV_PREFIX) or key in FOREIGN_ENV:
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in _FIELDS:
            raise ConfigError(f"unknown setting {key} in the environment; known: "
                              + ", ".join(ENV_PREFIX + n.upper() for n in _FIELDS))
        values[name] = _parse_text(name, text, f"environment variable {key}")
    return values


def _coerce_all(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r} in the {source}; known: {', '.join(_FIELDS)}")
    return {name: _coerce(name, value, source) for name, value in values.items()}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check a TOML/flag value's type against the field's default (ints are accepted for floats)."""
    default = getattr(_DEFAULTS, name)
    if isinstance(default, tuple):
        if isinstance(value, str):
            return _split_list(value)
        if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise ConfigError(f"{name} in the {source} must be a list of strings, got {value!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        raise ConfigError(f"{name} in the {source} must be {type(default).__name__}, got {value!r}")
    return value


def _parse_text(name: str, text: str, source: str) -> Any:
    default = getattr(_DEFAULTS, name)
    try:
        if isinstance(default, tuple):
            return _split_list(text)
        if isinstance(default, bool):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes")
        return type(default)(text)
    except ValueError:
        raise ConfigError(f"{name} from the {source} must be {type(default).__name__}, got {text!r}") from None


def _split_list(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    return tuple(item.strip() for item in items if item.strip())


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")


def _toml_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(json.dumps(item) for item in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_DEFAULTS = ServerConfig()  # after the helpers it validates with

__all__ = ["SERVE_SESSION_STORE", "ConfigError", "ServerConfig", "load_config"]
