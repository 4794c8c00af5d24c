"""Where protobuf meets domain objects, and nowhere else: `from_pb` for requests, `to_pb` for answers.

Requests become `DecodingParams` (validated here, once, with errors naming the proto field) and texts;
engine events, hypotheses and loaded bundles become messages. Nothing below `server/api/` sees protobuf.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from seqserve.v1 import service_pb2 as pb
from seqserve.v1.manifest_pb2 import Manifest, ModelKind
from server.decoding import Constraint, DecodingParams, FinishReason, Hypothesis
from server.decoding.limits import RequestLimits
from server.engine.validation import check_priority
from server.errors import InvalidArgument

_STRATEGIES = {
    pb.DecodingOptions.STRATEGY_UNSPECIFIED: "greedy",
    pb.DecodingOptions.STRATEGY_GREEDY: "greedy",
    pb.DecodingOptions.STRATEGY_SAMPLE: "sample",
    pb.DecodingOptions.STRATEGY_BEAM: "beam",
}
_FINISH_REASONS = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}
# DecodingParams field -> DecodingOptions field, where the names differ.
_PROTO_FIELDS = {"top_logprobs": "top_log_probs"}
_DEFAULT_PARAMS = DecodingParams()
# tokenizer -> every id's token string, built on first use (a chunk is built per request per step).
_TOKEN_STRINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --- requests ------------------------------------------------------------------------------------------

def params_from_pb(options: pb.DecodingOptions, limits: RequestLimits, *, single_result: bool = False,
                   where: str = "options") -> DecodingParams:
    """Validated DecodingParams for a request's options; InvalidArgument names e.g. "options.top_p".

    `single_result` is set for generations, which have one result, so n_best above 1 is refused.
    """
    if options.strategy not in _STRATEGIES:
        raise InvalidArgument(field=f"{where}.strategy", value=options.strategy,
                              allowed="one of " + ", ".join(pb.DecodingOptions.Strategy.keys()))
    strategy = _STRATEGIES[options.strategy]
    temperature = _float32(options.temperature) if options.HasField("temperature") else 1.0
    n_best = options.n_best or 1
    if n_best > 1 and single_result:
        raise InvalidArgument(field=f"{where}.n_best", value=n_best,
                              allowed="0 or 1 (a generation has one result)")
    if n_best > 1 and strategy != "beam":
        raise InvalidArgument(field=f"{where}.n_best", value=n_best,
                              allowed="0 or 1 unless strategy is STRATEGY_BEAM")
    if options.beam_size and strategy != "beam":
        raise InvalidArgument(field=f"{where}.beam_size", value=options.beam_size,
                              allowed="0 unless strategy is STRATEGY_BEAM")
    params = DecodingParams(
        strategy=strategy,
        max_new_tokens=options.max_new_tokens or limits.default_max_new_tokens,
        min_new_tokens=options.min_new_tokens,
        temperature=temperature,
        top_k=options.top_k,
        top_p=_float32(options.top_p) if options.HasField("top_p") else 1.0,
        seed=options.seed if options.HasField("seed") else None,
        beam_size=options.beam_size or min(limits.default_beam_size, limits.max_beam_size),
        length_penalty=(_float32(options.length_penalty) if options.HasField("length_penalty")
                        else _DEFAULT_PARAMS.length_penalty),
        n_best=n_best,
        early_stopping=options.early_stopping,
        stop=tuple(options.stop),
        repetition_penalty=(_float32(options.repetition_penalty) if options.HasField("repetition_penalty")
                            else 1.0),
        no_repeat_ngram_size=options.no_repeat_ngram_size,
        return_log_probs=options.return_log_probs,
        top_logprobs=options.top_log_probs,
        constraint=constraint_from_pb(options.constraint, where) if options.HasField("constraint") else None,
    )
    if not params.return_log_probs and params.top_logprobs:
        params = replace(params, return_log_probs=True)  # alternatives come with the chosen token's log-prob
    try:
        return params.validate(limits.max_new_tokens, max_beam_size=limits.max_beam_size,
                               max_constraint_chars=limits.constraints.max_chars)
    except InvalidArgument as error:
        raise renamed(error, where) from None


def constraint_from_pb(message: pb.Constraint, where: str = "options") -> Constraint:
    """The Constraint of a DecodingOptions.constraint (its shape is checked by DecodingParams.validate)."""
    kind = message.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(f"{where}.constraint must set one of regex, choice, json_schema, grammar",
                              field=f"{where}.constraint")
    if kind == "choice":
        return Constraint.choice(message.choice.values)
    return Constraint(kind, getattr(message, kind))


def priority_from_pb(priority: int, limits: RequestLimits, where: str = "priority") -> int:
    """A request's priority, in the server's range (INVALID_ARGUMENT naming `where` otherwise)."""
    return check_priority(where, priority, limits.min_priority, limits.max_priority)


def sources_from_pb(sources: Sequence[str], limits: RequestLimits) -> list[str]:
    """The source texts of a Translate request: at least one, at most `max_sources`, none empty."""
    if not sources:
        raise InvalidArgument(field="sources", value=[], allowed="a list of 1 or more source texts")
    if len(sources) > limits.max_sources:
        raise InvalidArgument(f"sources must hold at most {limits.max_sources} texts, got {len(sources)}",
                              field="sources", value=len(sources), allowed=f"at most {limits.max_sources} texts")
    for index, text in enumerate(sources):
        check_text(f"sources[{index}]", text)
    return list(sources)


def check_text(field: str, text: str, *, allow_empty: bool = False) -> str:
    """Refuse an empty (or blank) text, which has nothing to translate."""
    if not allow_empty and not text.strip():
        raise InvalidArgument(field=field, value=text, allowed="a non-empty text")
    return text


# --- answers -------------------------------------------------------------------------------------------

def finish_reason_to_pb(reason: FinishReason | str | None) -> int:
    if reason is None:
        return pb.FINISH_REASON_UNSPECIFIED
    return _FINISH_REASONS.get(FinishReason(reason), pb.FINISH_REASON_UNSPECIFIED)


def top_log_probs_to_pb(alternatives, vocab) -> list[pb.TopLogProbs]:
    """One TopLogProbs per position from `alternatives`: per position, (ids, log_probs) or (id, lp) pairs.

    Padding entries (id -1 or a NaN log-prob, for rows that asked for fewer) are dropped.
    """
    out = []
    for position in alternatives or ():
        pairs = _pairs(position)
        out.append(pb.TopLogProbs(candidates=[
            pb.TokenLogProb(token_id=int(t), token=_token(vocab, t), log_prob=float(p))
            for t, p in pairs if int(t) >= 0 and not math.isnan(float(p))]))
    return out


def chunk_to_pb(token_ids: Sequence[int], text: str, first_token_index: int, vocab,
                log_probs: Sequence[float] | None = None, alternatives=None,
                into: pb.TokenChunk | None = None) -> pb.TokenChunk:
    """A TokenChunk of one or several (coalesced) tokens; `into` (an empty TokenChunk, e.g. a response's
    chunk field, so the chunk is not copied into the response) is filled and returned when given."""
    strings = token_strings(vocab)
    chunk = pb.TokenChunk() if into is None else into
    chunk.text = text
    ids, pieces = chunk.token_ids, chunk.tokens
    for token in token_ids:  # usually one: a step's token
        token = int(token)
        ids.append(token)
        pieces.append(strings[token] if 0 <= token < len(strings) else _token(vocab, token))
    chunk.first_token_index = first_token_index
    if log_probs:
        chunk.log_probs.extend(float(p) for p in log_probs)
    if alternatives:
        chunk.top_log_probs.extend(top_log_probs_to_pb(alternatives, vocab))
    return chunk


def hypothesis_to_pb(hypothesis: Hypothesis, vocab, *, text: str | None = None, token_log_probs=None,
                     alternatives=None, attention=None) -> pb.Hypothesis:
    """A decoded hypothesis as a message.

    A `Hypothesis` carries no per-token extras: its streamed log-probs and alternatives and its attention
    rows, when the request asked for them, are passed alongside.
    """
    tokens = [int(t) for t in hypothesis.tokens]
    message = pb.Hypothesis(
        text=vocab.decode(tokens) if text is None else text,
        token_ids=tokens,
        tokens=[_token(vocab, t) for t in tokens],
        score=float(hypothesis.score),
        log_prob=float(hypothesis.log_prob),
        finish_reason=finish_reason_to_pb(hypothesis.finish_reason),
    )
    if token_log_probs is not None and len(token_log_probs):
        message.token_log_probs.extend(float(p) for p in token_log_probs)
    if alternatives is not None and len(alternatives):
        message.top_log_probs.extend(top_log_probs_to_pb(alternatives, vocab))
    if attention is not None and len(attention):
        message.attention.extend(pb.AttentionRow(weights=[float(w) for w in row]) for row in attention)
    return message


def session_to_pb(info: Any) -> pb.Session:
    """A `server.sessions.SessionInfo` (times in unix seconds) as a Session message."""
    session = pb.Session(session_id=info.session_id, model=info.model, version=info.version,
                         tokens_consumed=info.tokens_consumed, age_seconds=info.age_seconds,
                         idle_seconds=info.idle_seconds, ttl_seconds=info.ttl_seconds, state_bytes=info.state_bytes,
                         generating=info.generating)
    session.created_at.FromNanoseconds(round(info.created_at * 1e9))
    session.last_used_at.FromNanoseconds(round(info.last_used_at * 1e9))
    session.expires_at.FromNanoseconds(round(info.expires_at * 1e9))
    return session


def feed_response_to_pb(result: Any) -> pb.FeedResponse:
    """A `server.sessions.FeedResult` as a FeedResponse."""
    response = pb.FeedResponse(tokens_fed=result.tokens_fed, tokens_consumed=result.tokens_consumed)
    if result.log_probs is not None:
        response.token_log_probs.extend(
            pb.TokenLogProb(token_id=int(t), token=token, log_prob=float(p))
            for t, token, p in zip(result.token_ids, result.tokens, result.log_probs, strict=True))
    return response


def model_info_to_pb(name: str, version: int, manifest: Manifest, *, providers: Sequence[str] = (),
                     requested_providers: Sequence[str] = (), variant: str = "", ready: bool = False
                     ) -> pb.ModelInfo:
    info = pb.ModelInfo(name=name, version=version, providers=list(providers),
                        requested_providers=list(requested_providers), variant=variant, ready=ready)
    info.manifest.CopyFrom(manifest)
    return info


def model_summary_to_pb(name: str, versions: Sequence[int], latest_version: int, kind: int | None,
                        ready: bool) -> pb.ModelSummary:
    return pb.ModelSummary(name=name, versions=sorted(int(v) for v in versions), latest_version=latest_version,
                           kind=kind if kind is not None else ModelKind.MODEL_KIND_UNSPECIFIED, ready=ready)


# --- helpers -------------------------------------------------------------------------------------------

def _float32(value: float) -> float:
    """The shortest decimal that is this float32: a client's 0.9 arrives as 0.9, not 0.8999999762."""
    if math.isnan(value) or math.isinf(value):
        return float(value)
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def renamed(error: InvalidArgument, where: str) -> InvalidArgument:
    """The same error naming the proto field ("options.top_log_probs") instead of the domain one."""
    if error.field is None:
        return error
    base, _, rest = error.field.partition("[")
    proto_field = f"{where}.{_PROTO_FIELDS.get(base, base)}" + (f"[{rest}" if rest else "")
    message = error.message
    if message.startswith(error.field):
        message = proto_field + message[len(error.field):]
    return InvalidArgument(message, field=proto_field, value=error.value, allowed=error.allowed)


def token_strings(vocab) -> list[str] | tuple[()]:
    """Every id's token string ("" where it has none), worked out once per tokenizer; () for a vocabulary
    that cannot tell its size (its ids are then looked up one by one)."""
    strings = _TOKEN_STRINGS.get(vocab)
    if strings is None:
        size = getattr(vocab, "get_vocab_size", None)
        id_to_token = vocab.id_to_token
        strings = [id_to_token(i) or "" for i in range(size(with_added_tokens=True))] if size is not None else ()
        _TOKEN_STRINGS[vocab] = strings
    return strings


def _token(vocab, token_id) -> str:
    token = vocab.id_to_token(int(token_id))
    return token if token is not None else ""


def _pairs(position) -> list[tuple[int, float]]:
    if isinstance(position, tuple) and len(position) == 2 and not np.isscalar(position[0]):
        ids, values = position  # (ids, log_probs) arrays
        return list(zip(np.asarray(ids).tolist(), np.asarray(values).tolist(), strict=True))
    return [(int(t), float(p)) for t, p in position]
