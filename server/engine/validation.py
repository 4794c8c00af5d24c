"""Requests checked once, on entry, against the model and the engine's limits; errors name the field.

A token id outside the vocabulary would make the graph fail for every row of the step, so ids are
checked here, not discovered there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from server.bundle import LoadedBundle
from server.decoding import DecodingParams
from server.engine.config import EngineConfig
from server.engine.constraints import compile_constraint
from server.engine.requests import FeedRequest, GenerationRequest, TranslationRequest, context_of
from server.errors import FailedPrecondition, InvalidArgument


def validate_request(request: GenerationRequest | TranslationRequest, bundle: LoadedBundle,
                     config: EngineConfig) -> tuple[DecodingParams, int, int]:
    """(validated params with a sampling seed, decode rows, input tokens), or a domain error.

    Parameters the API already validated (`DecodingParams.validated`) are not validated again; what only
    the model knows (its kind, its vocabulary, its state shapes) is checked here for every request."""
    spec = bundle.spec
    limits = config.limits
    is_lm = spec.is_lm
    if isinstance(request, GenerationRequest):
        if not is_lm:
            raise FailedPrecondition(f"model {bundle.name} is a translation model; it cannot continue a prompt")
        check_ids("prompt_ids", request.prompt_ids, spec.vocab_size, limits.max_input_tokens)
        if request.history_ids is not None:
            check_ids("history_ids", request.history_ids, spec.vocab_size, None)
        if request.initial_state is not None:
            check_state("initial_state", request.initial_state, spec.state_shapes)
        input_tokens = len(request.prompt_ids)
    elif isinstance(request, TranslationRequest):
        if is_lm:
            raise FailedPrecondition(f"model {bundle.name} is a language model; it cannot translate")
        check_ids("source_ids", request.source_ids, spec.source_vocab_size, limits.max_input_tokens)
        input_tokens = len(request.source_ids)
    else:
        raise TypeError(f"an engine takes GenerationRequest or TranslationRequest, got {type(request).__name__}")
    check_priority("priority", request.priority, limits.min_priority, limits.max_priority)
    if not isinstance(request.params, DecodingParams):
        raise TypeError(f"params must be DecodingParams, got {type(request.params).__name__}")
    params = request.params.validate(limits.max_new_tokens, max_beam_size=limits.max_beam_size,
                                     max_constraint_chars=limits.constraints.max_chars)
    if params.constraint is not None:  # compiled now (this process's cache), so admission only copies it
        compile_constraint(params, bundle, limits.constraints, context_of(request))
    if params.strategy == "beam" and params.beam_size > config.max_rows:
        raise InvalidArgument(field="beam_size", value=params.beam_size,
                              allowed=f"at most {config.max_rows} (the rows this server decodes at once)")
    rows = params.beam_size if params.strategy == "beam" else 1
    return params, rows, input_tokens


def validate_feed(request: FeedRequest, bundle: LoadedBundle, config: EngineConfig) -> None:
    spec = bundle.spec
    if not spec.is_lm:
        raise FailedPrecondition(f"model {bundle.name} is a translation model; sessions need a language model")
    vocab = spec.vocab_size
    check_ids("token_ids", request.token_ids, vocab, config.limits.max_input_tokens)
    if request.next_token_id is not None:
        check_ids("next_token_id", [request.next_token_id], vocab, None)
    if request.state is not None:
        check_state("state", request.state, spec.state_shapes)


def check_priority(field: str, value, low: int, high: int) -> int:
    """A request's priority: an integer in [low, high] (higher is sooner; 0 is the default)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise InvalidArgument(field=field, value=value,
                              allowed=f"an integer in [{low}, {high}] (higher is sooner, 0 is the default)")
    return int(value)


def check_ids(field: str, ids: Sequence[int], vocab_size: int, max_length: int | None) -> None:
    if len(ids) == 0:
        raise InvalidArgument(f"{field} must not be empty")
    if max_length is not None and len(ids) > max_length:
        raise InvalidArgument(f"{field} has {len(ids)} tokens, more than this server's limit of {max_length}",
                              field=field, value=len(ids), allowed=f"at most {max_length} tokens")
    array = np.asarray(ids)
    if array.dtype.kind not in "iu":
        raise InvalidArgument(field=field, value=list(ids)[:8], allowed="a list of integer token ids")
    bad = np.flatnonzero((array < 0) | (array >= vocab_size))
    if bad.size:
        raise InvalidArgument(f"{field}[{bad[0]}] must be a token id in [0, {vocab_size - 1}], got {array[bad[0]]}",
                              field=field, value=int(array[bad[0]]), allowed=f"in [0, {vocab_size - 1}]")


def check_state(field: str, state, shapes: Sequence[tuple[int, ...]]) -> None:
    if not isinstance(state, (tuple, list)) or len(state) != len(shapes):
        raise InvalidArgument(f"{field} must hold {len(shapes)} arrays, got "
                              f"{len(state) if isinstance(state, (tuple, list)) else type(state).__name__}")
    for i, (tensor, shape) in enumerate(zip(state, shapes, strict=True)):
        expected = (1, *shape)
        if not isinstance(tensor, np.ndarray) or tensor.shape != expected:
            got = tensor.shape if isinstance(tensor, np.ndarray) else type(tensor).__name__
            raise InvalidArgument(f"{field}[{i}] must be an array of shape {list(expected)}, got {got}")

