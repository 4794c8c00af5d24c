"""ONNX Runtime specifics: which execution providers to ask for, session options from configuration,
and how a session's real inputs and outputs compare with a graph's manifest entry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import onnxruntime as ort

from seqserve.v1.manifest_pb2 import Graph

logger = logging.getLogger(__name__)

# seqserve sends nothing anywhere: ONNX Runtime's telemetry events are off in every process that serves.
ort.disable_telemetry_events()

CPU_PROVIDER = "CPUExecutionProvider"

# A provider is a name, or a name with its ONNX Runtime provider options.
ProviderSpec = str | tuple[str, Mapping[str, Any]]

# Manifest dtype -> the type string ONNX Runtime reports for a tensor input or output.
_ORT_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "float64": "tensor(double)",
    "int64": "tensor(int64)",
    "int32": "tensor(int32)",
    "int8": "tensor(int8)",
    "uint8": "tensor(uint8)",
    "bool": "tensor(bool)",
}

_DTYPES_BY_ORT_TYPE = {ort_type: dtype for dtype, ort_type in _ORT_TYPES.items()}

_GRAPH_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

_EXECUTION_MODES = {
    "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
    "parallel": ort.ExecutionMode.ORT_PARALLEL,
}


def resolve_providers(providers: Sequence[ProviderSpec]) -> list[ProviderSpec]:
    """The providers to ask ONNX Runtime for: unavailable ones dropped, duplicates removed, CPU last.

    `get_available_providers()` only says what this build of ONNX Runtime contains (the GPU package
    lists CUDA on machines without a GPU), so the providers a session really got must still be read
    back from the session.
    """
    if isinstance(providers, str):
        providers = [providers]  # one name, not a sequence of one-letter names
    available = set(ort.get_available_providers())
    resolved: list[ProviderSpec] = []
    seen: set[str] = set()
    cpu: ProviderSpec = CPU_PROVIDER
    for spec in providers:
        name = provider_name(spec)
        if name in seen:
            continue
        seen.add(name)
        if name == CPU_PROVIDER:
            cpu = spec  # keep its options, but CPU always goes last as the fallback
        elif name not in available:
            logger.warning(
                "execution provider %s is not in this ONNX Runtime build (it has %s); dropped",
                name,
                ", ".join(sorted(available)),
            )
        else:
            resolved.append(_as_ort_provider(spec))
    resolved.append(_as_ort_provider(cpu))
    return resolved


def make_session_options(options: Mapping[str, Any] | None = None) -> ort.SessionOptions:
    """ONNX Runtime session options from configuration.

    Keys: `intra_op_num_threads` and `inter_op_num_threads` (0 = ONNX Runtime decides),
    `graph_optimization_level` ("disable", "basic", "extended", "all"), `execution_mode`
    ("sequential", "parallel"), `allow_spinning` (bool), `log_severity_level` (0 verbose .. 4 fatal). Unknown keys and
    values raise ValueError, so a misspelt setting is never silently ignored.
    """
    session_options = ort.SessionOptions()
    for key, value in (options or {}).items():
        if key in ("intra_op_num_threads", "inter_op_num_threads"):
            setattr(session_options, key, _non_negative_int(key, value))
        elif key == "graph_optimization_level":
            session_options.graph_optimization_level = _choice(key, value, _GRAPH_OPTIMIZATION_LEVELS)
        elif key == "execution_mode":
            session_options.execution_mode = _choice(key, value, _EXECUTION_MODES)
        elif key == "allow_spinning":
            # Spinning intra-op threads burn a core waiting for work; on a small machine they starve the
            # Python thread that prepares the next step, so the server turns them off by default.
            session_options.add_session_config_entry("session.intra_op.allow_spinning", "1" if value else "0")
        elif key == "log_severity_level":
            level = _non_negative_int(key, value)
            if level > 4:
                raise ValueError(f"session option log_severity_level must be in [0, 4], got {level}")
            session_options.log_severity_level = level
        else:
            raise ValueError(
                f"unknown session option {key!r}; known: intra_op_num_threads, inter_op_num_threads, "
                "graph_optimization_level, execution_mode, allow_spinning, log_severity_level"
            )
    return session_options


def check_graph_io(spec: Graph, session: ort.InferenceSession) -> list[str]:
    """Differences between a graph's manifest entry and the inputs/outputs the session really has."""
    problems = _compare_tensors(spec.file, "input", spec.inputs, session.get_inputs())
    problems += _compare_tensors(spec.file, "output", spec.outputs, session.get_outputs())
    return problems


def _compare_tensors(file_name: str, direction: str, expected_specs, actual_args) -> list[str]:
    expected = {tensor.name: tensor for tensor in expected_specs}
    actual = {arg.name: arg for arg in actual_args}
    problems = []
    for name in expected.keys() - actual.keys():
        problems.append(f"graph {file_name} has no {direction} {name!r} that the manifest lists")
    for name in actual.keys() - expected.keys():
        problems.append(f"graph {file_name} has {direction} {name!r} that the manifest does not list")
    for name in expected.keys() & actual.keys():
        tensor, arg = expected[name], actual[name]
        where = f"graph {file_name} {direction} {name!r}"
        actual_dtype = _DTYPES_BY_ORT_TYPE.get(arg.type, arg.type)
        if actual_dtype != tensor.dtype:
            problems.append(f"{where} has dtype {actual_dtype}, the manifest says {tensor.dtype}")
        if arg.shape is None:
            continue  # the graph does not declare a shape, so there is nothing to compare
        if len(arg.shape) != len(tensor.shape):
            problems.append(
                f"{where} has rank {len(arg.shape)}, the manifest says {len(tensor.shape)} "
                f"([{', '.join(tensor.shape)}])"
            )
            continue
        for axis, (declared, real) in enumerate(zip(tensor.shape, arg.shape, strict=True)):
            if not isinstance(real, int):
                continue  # a dynamic axis in the graph accepts whatever the manifest allows
            if not declared.isdigit():
                # The case exporters must catch: an axis frozen to the example's length.
                problems.append(f"{where} fixes axis {axis} to {real}, the manifest has dynamic {declared!r}")
            elif int(declared) != real:
                problems.append(f"{where} has size {real} on axis {axis}, the manifest says {declared}")
    return sorted(problems)


def provider_name(spec: ProviderSpec) -> str:
    if isinstance(spec, str):
        return spec
    is_pair = isinstance(spec, tuple) and len(spec) == 2
    if is_pair and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        return spec[0]
    raise ValueError(f"execution provider {spec!r} is neither a name nor a (name, options) pair")


def _as_ort_provider(spec: ProviderSpec) -> ProviderSpec:
    # ONNX Runtime wants provider options as a plain dict of strings.
    if isinstance(spec, str):
        return spec
    name, options = spec
    return (name, {str(key): str(value) for key, value in options.items()})


def _non_negative_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"session option {key} must be a non-negative integer, got {value!r}")
    return value


def _choice(key: str, value: Any, choices: Mapping[str, Any]) -> Any:
    if value in choices.values():
        return value  # already an ONNX Runtime enum
    if isinstance(value, str) and value.lower() in choices:
        return choices[value.lower()]
    raise ValueError(f"session option {key} must be one of {', '.join(choices)}, got {value!r}")
