"""Where Open Inference Protocol messages meet domain objects: TEXT / SCORE tensors and request parameters.

Tensors are Triton's: BYTES elements are UTF-8 strings, each preceded by its 4-byte little-endian length in
`raw_input_contents` (or one per entry of `contents.bytes_contents`); FP32 is little-endian floats.
Parameters carry the decoding options under the names of `seqserve.v1.DecodingOptions`; they become a
`DecodingOptions` message and are validated by `convert.params_from_pb`, so the errors are the native API's
("parameters.top_p must be in (0, 1], got 1.5").
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from seqserve.v1 import service_pb2 as pb
from server.api import convert
from server.decoding import DecodingParams
from server.decoding.limits import RequestLimits
from server.errors import InvalidArgument, shown

TEXT, SCORE = "TEXT", "SCORE"
BYTES, FP32 = "BYTES", "FP32"
FINAL_RESPONSE = "triton_final_response"

_STRATEGIES = {"greedy": pb.DecodingOptions.STRATEGY_GREEDY, "sample": pb.DecodingOptions.STRATEGY_SAMPLE,
               "beam": pb.DecodingOptions.STRATEGY_BEAM}
_INT32_OPTIONS = ("max_new_tokens", "min_new_tokens", "top_k", "beam_size", "n_best", "no_repeat_ngram_size")
_FLOAT_OPTIONS = ("temperature", "top_p", "length_penalty", "repetition_penalty")
_SEQUENCE = ("sequence_id", "sequence_start", "sequence_end")
# Parameters clients send that need no action here: Triton's timeout hint (the gRPC deadline is the timeout
# that counts) and its own `triton_*` controls.
_ACCEPTED = ("timeout",)
CONSTRAINT_NAMES = ("regex", "choice", "json_schema", "grammar")  # DecodingOptions.constraint, one at most
OPTION_NAMES = ("strategy", *_INT32_OPTIONS, *_FLOAT_OPTIONS, "seed", "early_stopping", "stop", *CONSTRAINT_NAMES)


@dataclass(frozen=True)
class SequenceControl:
    """A request's place in a Triton sequence (a session): its id, and whether it starts or ends it."""

    id: int | str
    start: bool = False
    end: bool = False


@dataclass
class InferParameters:
    """A request's parameters, sorted: decoding options (as a DecodingOptions message), sequence controls."""

    options: pb.DecodingOptions = field(default_factory=pb.DecodingOptions)
    given: set[str] = field(default_factory=set)  # the option names the request set
    sequence: SequenceControl | None = None
    triton_priority: int = 0  # Triton's priority level: 0 = the default, 1 = the highest, 2 the next, ...

    def decoding_params(self, limits: RequestLimits, *, single_result: bool) -> DecodingParams:
        try:
            return convert.params_from_pb(self.options, limits, single_result=single_result, where="parameters")
        except InvalidArgument as error:
            raise constraint_error(error) from None

    def priority(self, limits: RequestLimits) -> int:
        """Triton's priority level as seqserve's priority (higher is sooner): level 0 is the default priority 0,
        level 1 the highest (`max_priority`), each level after it one lower, down to `min_priority`."""
        level = self.triton_priority
        if level == 0:
            return 0
        levels = limits.max_priority - limits.min_priority + 1
        if level > levels:
            raise InvalidArgument(field="parameters.priority", value=level,
                                  allowed=f"0 (the default) or a level from 1 (the highest, priority "
                                  f"{limits.max_priority}) to {levels} (the lowest, priority {limits.min_priority})")
        return limits.max_priority + 1 - level


def constraint_error(error: InvalidArgument) -> InvalidArgument:
    """An error about "parameters.constraint.<kind>" as this protocol names it: the parameter "<kind>"
    ("parameters.choice[2]" for a choice's value)."""
    prefix = "parameters.constraint."
    if error.field is None or not error.field.startswith(prefix):
        return error
    field = "parameters." + error.field[len(prefix):].replace("choice.values", "choice")
    message = error.message
    if message.startswith(error.field):
        message = field + message[len(error.field):]
    return InvalidArgument(message, field=field, value=error.value, allowed=error.allowed)


def parameters_from_pb(parameters: Mapping[str, object]) -> InferParameters:
    """Sort and type-check a request's parameters; an unknown name is INVALID_ARGUMENT listing the known ones."""
    result = InferParameters()
    options = result.options
    sequence: dict[str, object] = {}
    for name in sorted(parameters):
        parameter = parameters[name]
        where = f"parameters.{name}"
        if name in _SEQUENCE:
            sequence[name] = _sequence_id(parameter, where) if name == "sequence_id" else _bool(parameter, where)
        elif name == "strategy":
            value = _string(parameter, where)
            if value not in _STRATEGIES:
                raise InvalidArgument(field=where, value=value, allowed="greedy, sample or beam")
            options.strategy = _STRATEGIES[value]
        elif name in _INT32_OPTIONS:
            setattr(options, name, _int(parameter, where, -2**31, 2**31 - 1))
        elif name in _FLOAT_OPTIONS:
            setattr(options, name, _float(parameter, where))
        elif name == "seed":
            options.seed = _int(parameter, where, 0, 2**64 - 1)
        elif name == "priority":
            result.triton_priority = _int(parameter, where, 0, 2**64 - 1)
        elif name == "early_stopping":
            options.early_stopping = _bool(parameter, where)
        elif name == "stop":
            options.stop.extend(_stop(parameter, where))
        elif name in CONSTRAINT_NAMES:
            given = [other for other in CONSTRAINT_NAMES if other in parameters and other != name]
            if given:
                raise InvalidArgument(f"{where} and parameters.{given[0]} cannot both be set: a request has one "
                                      "constraint", field=where, value=name,
                                      allowed="one of " + ", ".join(CONSTRAINT_NAMES))
            if name == "choice":
                options.constraint.choice.values.extend(_choices(parameter, where))
            else:
                setattr(options.constraint, name, _string(parameter, where))
        elif name in _ACCEPTED or name.startswith("triton_"):
            continue
        else:
            raise InvalidArgument(field=where, value=name, allowed="a decoding option (" + ", ".join(OPTION_NAMES)
                                  + "), priority, or sequence_id, sequence_start, sequence_end")
        if name in OPTION_NAMES:
            result.given.add(name)
    if sequence.get("sequence_id") not in (None, 0, ""):
        result.sequence = SequenceControl(sequence["sequence_id"], bool(sequence.get("sequence_start")),
                                    bool(sequence.get("sequence_end")))
    elif sequence.get("sequence_start") or sequence.get("sequence_end"):
        flag = "sequence_start" if sequence.get("sequence_start") else "sequence_end"
        raise InvalidArgument(f"parameters.{flag} needs a parameters.sequence_id (a non-zero integer or a "
                              f"non-empty string), got {sequence.get('sequence_id')!r}",
                              field="parameters.sequence_id", value=sequence.get("sequence_id"),
                              allowed="a non-zero integer or a non-empty string")
    return result


# --- tensors ---------------------------------------------------------------------------------------------

def text_input(request, *, max_items: int, one: bool) -> tuple[list[str], tuple[int, ...]]:
    """The strings of the request's one input, TEXT (BYTES), and its shape.

    `one` (a language model's prompt): exactly one element. Otherwise 1 to `max_items` elements shaped
    [n] or [n, 1] (Triton's batched form).
    """
    if len(request.inputs) != 1:
        raise InvalidArgument(f"inputs must hold one tensor, {TEXT}; got {len(request.inputs)}: "
                              f"{[tensor.name for tensor in request.inputs]}", field="inputs",
                              value=len(request.inputs), allowed=f"one tensor named {TEXT}")
    tensor = request.inputs[0]
    if tensor.name != TEXT:
        raise InvalidArgument(field="inputs[0].name", value=tensor.name, allowed=TEXT)
    if tensor.datatype != BYTES:
        raise InvalidArgument(f"inputs[0].datatype of {TEXT} must be {BYTES}, got {tensor.datatype!r}",
                              field="inputs[0].datatype", value=tensor.datatype, allowed=BYTES)
    shape = tuple(int(d) for d in tensor.shape)
    count = math.prod(shape) if shape else 1
    if one:
        if count != 1 or any(d < 0 for d in shape):
            raise InvalidArgument(f"inputs[0].shape of {TEXT} must hold one prompt ([1]), got {list(shape)}",
                                  field="inputs[0].shape", value=list(shape), allowed="[1]")
    elif len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or not 1 <= shape[0] <= max_items:
        raise InvalidArgument(f"inputs[0].shape of {TEXT} must be [n] or [n, 1] with n from 1 to {max_items}, "
                              f"got {list(shape)}", field="inputs[0].shape", value=list(shape),
                              allowed=f"[n] or [n, 1], 1 <= n <= {max_items}")
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidArgument(f"raw_input_contents must hold one entry per input ({len(request.inputs)}), "
                                  f"got {len(request.raw_input_contents)}", field="raw_input_contents",
                                  value=len(request.raw_input_contents), allowed=str(len(request.inputs)))
        items = decode_bytes(request.raw_input_contents[0], "raw_input_contents[0]")
    else:
        items = list(tensor.contents.bytes_contents)
    if len(items) != count:
        raise InvalidArgument(f"inputs[0] ({TEXT}) has shape {list(shape)}, so {count} elements, but carries "
                              f"{len(items)}", field="inputs[0].shape", value=list(shape),
                              allowed=f"a shape of {len(items)} elements")
    texts = []
    for index, item in enumerate(items):
        try:
            texts.append(item.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidArgument(f"{TEXT}[{index}] must be valid UTF-8, got the bytes {item[:32]!r}",
                                  field=f"{TEXT}[{index}]", value=item[:32], allowed="valid UTF-8") from None
    return texts, shape


def requested_outputs(request, available: Sequence[str]) -> tuple[str, ...]:
    """The outputs to send: those the request names (all of `available` when it names none)."""
    names = []
    for index, output in enumerate(request.outputs):
        if output.name not in available:
            raise InvalidArgument(field=f"outputs[{index}].name", value=output.name, allowed=" or ".join(available))
        names.append(output.name)
    return tuple(names) if names else tuple(available)


def decode_bytes(data: bytes, where: str) -> list[bytes]:
    """Triton's BYTES serialisation: each element is a 4-byte little-endian length, then the bytes."""
    items, position, size = [], 0, len(data)
    while position < size:
        if position + 4 > size:
            raise InvalidArgument(f"{where} ends inside an element's 4-byte length (at byte {position} of {size})",
                                  field=where, value=size, allowed="4-byte little-endian length + bytes, repeated")
        (length,) = struct.unpack_from("<I", data, position)
        position += 4
        if position + length > size:
            raise InvalidArgument(f"{where} declares an element of {length} bytes at byte {position - 4}, but "
                                  f"only {size - position} remain", field=where, value=size,
                                  allowed="4-byte little-endian length + bytes, repeated")
        items.append(data[position:position + length])
        position += length
    return items


def encode_bytes(texts: Sequence[str]) -> bytes:
    parts = []
    for text in texts:
        data = text.encode("utf-8")
        parts += (struct.pack("<I", len(data)), data)
    return b"".join(parts)


def add_output(response, name: str, datatype: str, shape: Sequence[int], raw: bytes) -> None:
    """One output tensor and its raw contents, appended to a ModelInferResponse."""
    tensor = response.outputs.add()
    tensor.name, tensor.datatype = name, datatype
    tensor.shape.extend(int(d) for d in shape)
    response.raw_output_contents.append(raw)


def add_text_output(response, texts: Sequence[str], shape: Sequence[int]) -> None:
    add_output(response, TEXT, BYTES, shape, encode_bytes(texts))


def add_score_output(response, scores: Sequence[float], shape: Sequence[int]) -> None:
    add_output(response, SCORE, FP32, shape, np.asarray(scores, dtype="<f4").tobytes())


def set_parameter(message, name: str, value: bool | int | str | float) -> None:
    """Set `message.parameters[name]` to `value` in the InferParameter field of its type."""
    parameter = message.parameters[name]
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = value


# --- parameter values --------------------------------------------------------------------------------------

def _value(parameter):
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def _kind(value) -> str:
    return {bool: "a bool", int: "an integer", float: "a double", str: "a string"}.get(type(value), "nothing")


def _int(parameter, where: str, low: int, high: int) -> int:
    value = _value(parameter)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{where} must be an integer, got {_kind(value)} ({value!r})", field=where, value=value,
                              allowed="an integer")
    if not low <= value <= high:
        raise InvalidArgument(field=where, value=value, allowed=f"an integer from {low} to {high}")
    return value


def _float(parameter, where: str) -> float:
    value = _value(parameter)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{where} must be a number, got {_kind(value)} ({value!r})", field=where, value=value,
                              allowed="a number")
    return float(value)


def _bool(parameter, where: str) -> bool:
    value = _value(parameter)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where} must be a bool, got {_kind(value)} ({value!r})", field=where, value=value,
                              allowed="true or false")
    return value


def _string(parameter, where: str) -> str:
    value = _value(parameter)
    if not isinstance(value, str):
        raise InvalidArgument(f"{where} must be a string, got {_kind(value)} ({value!r})", field=where, value=value,
                              allowed="a string")
    return value


def _sequence_id(parameter, where: str) -> int | str:
    value = _value(parameter)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, int) and value < 0):
        raise InvalidArgument(f"{where} must be an unsigned integer or a string, got {_kind(value)} ({value!r})",
                              field=where, value=value, allowed="an unsigned integer or a string")
    return value


def _choices(parameter, where: str) -> list[str]:
    """A choice constraint's values: a JSON array of strings ('["yes", "no"]')."""
    value = _string(parameter, where)
    try:
        choices = json.loads(value)
    except json.JSONDecodeError:
        choices = None
    if not isinstance(choices, list) or not all(isinstance(choice, str) for choice in choices):
        raise InvalidArgument(f"{where} must be a JSON array of strings, got {shown(value)}", field=where,
                              value=value, allowed='a JSON array of strings, e.g. ["yes", "no"]')
    return choices


def _stop(parameter, where: str) -> list[str]:
    """One stop string, or several as a JSON array of strings ('["\\n", "."]')."""
    value = _string(parameter, where)
    if value.startswith("["):
        try:
            stops = json.loads(value)
        except json.JSONDecodeError:
            stops = None
        if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
            raise InvalidArgument(f"{where} starting with '[' must be a JSON array of strings, got {value!r}",
                                  field=where, value=value, allowed="a string, or a JSON array of strings")
        return stops
    return [value]
