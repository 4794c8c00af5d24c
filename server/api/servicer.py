"""The Seqserve gRPC servicer: thin. Protobuf in, domain requests to the model's engine, events out.

Validation and conversion live in `convert`, status codes in `status`, applied by the interceptor in
`errors` (this module only raises domain errors), a model's tokenizers and answers in `served_model`,
sessions in `server.sessions`, the Converse multiplexing in `converse`. Streams send the tokens of each
engine step as they come; when the client reads slower than the engine decodes, the tokens that piled up
go out together as one TokenChunk. A cancelled or disconnected client cancels the engine request, so its
rows leave the batch at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from seqserve.bundle import MANIFEST_FILE, BundleError, bundle_path, read_manifest
from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc
from seqserve.v1.manifest_pb2 import ModelKind
from server.api import convert
from server.api.constraints import check_constraint, edge_error
from server.api.converse import converse
from server.api.errors import request_id_var
from server.api.served_model import ServedModel, TokenLog
from server.bundle.sessions import provider_name
from server.decoding.limits import RequestLimits
from server.engine.requests import FinishEvent, GenerationRequest, TokenEvent, TranslationRequest
from server.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, SeqserveError, Unavailable
from server.sessions import SessionManager

logger = logging.getLogger(__name__)

MAX_NAME_CHARS = 255  # a model's name is a directory name of the repository

_KIND_OF_RPC = {"Translate": ModelKind.MODEL_KIND_SEQ2SEQ, "TranslateStream": ModelKind.MODEL_KIND_SEQ2SEQ,
                "Generate": ModelKind.MODEL_KIND_LM}


class SeqserveServicer(pb_grpc.SeqserveServicer):
    """Answers the Seqserve RPCs from the engines of `registry` (a `server.registry.ModelRegistry`) and the
    sessions of `sessions` (by default a `SessionManager` of the registry with default limits)."""

    def __init__(self, registry, limits: RequestLimits,
                 observe_tokens: Callable[[str, float | None, float], None] | None = None,
                 sessions: SessionManager | None = None, stream_interval: float = 0.0):
        self._registry = registry
        self._limits = limits
        self._sessions = sessions if sessions is not None else SessionManager(registry)
        self._stream_interval = stream_interval  # seconds; 0: a stream sends whenever it can
        # observe_tokens(model, seconds since the previous chunk (None for the first), seconds since start)
        self._observe_tokens = observe_tokens or (lambda *args: None)

    # --- translation -----------------------------------------------------------------------------------

    async def Translate(self, request: pb.TranslateRequest, context) -> pb.TranslateResponse:
        sources = convert.sources_from_pb(request.sources, self._limits)
        params = convert.params_from_pb(request.options, self._limits)
        priority = convert.priority_from_pb(request.priority, self._limits)
        model = await self._model(request.model, request.version, "Translate")
        await check_constraint(model, params, self._limits)
        for i, text in enumerate(sources):  # every cap first: no source is tokenized when one is refused
            model.check_source_chars(text, f"sources[{i}]")
        encoded = [await model.encode_source(text, f"sources[{i}]") for i, text in enumerate(sources)]
        deadline = _deadline(context)
        streams = []
        try:
            for index, source_ids in enumerate(encoded):
                streams.append(model.engine.submit(TranslationRequest(
                    f"{request_id_var.get()}/{index}", source_ids, params, request.return_attention, deadline,
                    priority)))
            results = await asyncio.gather(*(_collect(stream) for stream in streams))
        finally:
            for stream in streams:
                stream.cancel()  # a no-op for finished ones; frees the rest if one failed
        response = pb.TranslateResponse(model=model.name, version=model.version)
        for source_ids, (finish, tokens) in zip(encoded, results, strict=True):
            _raise_if_deadline(finish, context)
            response.translations.append(model.translation(finish, tokens, source_ids, request.return_attention))
        return response

    async def TranslateStream(self, request: pb.TranslateStreamRequest, context
                              ) -> AsyncIterator[pb.TranslateStreamResponse]:
        arrived = time.perf_counter()
        convert.check_text("source", request.source)
        params = convert.params_from_pb(request.options, self._limits)
        priority = convert.priority_from_pb(request.priority, self._limits)
        model = await self._model(request.model, request.version, "TranslateStream")
        await check_constraint(model, params, self._limits)
        source_ids = await model.encode_source(request.source, "source")
        stream = model.engine.submit(TranslationRequest(request_id_var.get(), source_ids, params,
                                                        request.return_attention, _deadline(context), priority))
        tokens = TokenLog()
        # The proto promises beam translations no chunks: the full n-best list comes in .done.
        async for item in self._chunks(stream, model, tokens, arrived, pb.TranslateStreamResponse,
                                       send_tokens=params.strategy != "beam", batches=self._ready_batches):
            if not isinstance(item, FinishEvent):
                yield item  # a chunk
                continue
            _raise_if_deadline(item, context)
            done = pb.TranslateStreamDone(model=model.name, version=model.version,
                                          finish_reason=convert.finish_reason_to_pb(item.reason))
            done.translation.CopyFrom(model.translation(item, tokens, source_ids, request.return_attention))
            yield pb.TranslateStreamResponse(done=done)

    # --- generation ------------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        arrived = time.perf_counter()
        params = convert.params_from_pb(request.options, self._limits, single_result=True)
        priority = convert.priority_from_pb(request.priority, self._limits)
        model = await self._model(request.model, request.version, "Generate")
        prompt_ids = await model.encode_prompt(request.prompt)
        await check_constraint(model, params, self._limits, context_ids=prompt_ids)
        stream = model.engine.submit(GenerationRequest(request_id_var.get(), prompt_ids, params,
                                                       deadline=_deadline(context), priority=priority))
        async for item in self._chunks(stream, model, TokenLog(), arrived, pb.GenerateResponse,
                                       batches=self._ready_batches):
            if not isinstance(item, FinishEvent):
                yield item  # a chunk
                continue
            _raise_if_deadline(item, context)
            yield pb.GenerateResponse(done=model.generation_done(item, params.stop, item.prompt_tokens))

    # --- models ----------------------------------------------------------------------------------------

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        models = []
        for status in self._registry.models():
            latest = status.serving_version if status.serving_version is not None else max(status.versions)
            kind = status.spec.kind.to_pb() if status.spec is not None else None
            models.append(convert.model_summary_to_pb(status.name, status.versions, latest, kind,
                                                      ready=status.serving_version is not None))
        return pb.ListModelsResponse(models=models)

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.ModelInfo:
        """The manifest and providers of a loaded version; a version on disk but not loaded (GetModel never
        loads one) is described from its manifest with ready = false and no providers."""
        name, version = _checked_name(request.model, request.version)
        status = next((s for s in self._registry.models() if s.name == name), None)
        if status is None:
            raise NotFound(f"unknown model {name!r}; ListModels lists the models of this server")
        version = version or (status.serving_version or max(status.versions))
        if version in status.loaded_versions:
            engine = await self._registry.get(name, version)
            bundle = engine.bundle
            return convert.model_info_to_pb(name, version, bundle.manifest, providers=bundle.providers,
                                            requested_providers=bundle.requested_providers,
                                            variant=bundle.variant, ready=engine.accepting)
        if version not in status.versions:
            raise NotFound(f"model {name!r} has no version {version}; it has {', '.join(map(str, status.versions))}")
        try:
            manifest = read_manifest(bundle_path(self._registry.repository, name, version) / MANIFEST_FILE)
        except BundleError as error:
            raise Unavailable(f"model {name} version {version} cannot be described: {error}") from error
        return convert.model_info_to_pb(name, version, manifest,
                                        requested_providers=[provider_name(p) for p in self._registry.providers],
                                        variant=self._registry.variant)

    # --- sessions ----------------------------------------------------------------------------------
    # The context argument is unused, so Converse calls these handlers with None.

    async def CreateSession(self, request: pb.CreateSessionRequest, context) -> pb.Session:
        name, version = _checked_name(request.model, request.version)
        return convert.session_to_pb(await self._sessions.create(name, version, request.prefix, request.ttl_seconds))

    async def Feed(self, request: pb.FeedRequest, context) -> pb.FeedResponse:
        result = await self._sessions.feed(request.session_id, request.text, request.return_log_probs,
                                           request_id=request.request_id)
        return convert.feed_response_to_pb(result)

    async def GenerateInSession(self, request: pb.GenerateInSessionRequest, context
                                ) -> AsyncIterator[pb.GenerateResponse]:
        async for response in self._generate_in_session(request, request_id_var.get(), self._ready_batches):
            yield response

    async def ForkSession(self, request: pb.ForkSessionRequest, context) -> pb.Session:
        return convert.session_to_pb(await self._sessions.fork(request.session_id, request.ttl_seconds))

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.Session:
        # Answers during a generation (Session.generating); Converse's get waits for it like any operation.
        return convert.session_to_pb(await self._sessions.get(request.session_id))

    async def CloseSession(self, request: pb.CloseSessionRequest, context) -> pb.CloseSessionResponse:
        return pb.CloseSessionResponse(session=convert.session_to_pb(await self._sessions.close(request.session_id)))

    async def ExportSession(self, request: pb.ExportSessionRequest, context) -> pb.ExportSessionResponse:
        data = await self._sessions.export(request.session_id)
        info = await self._sessions.get(request.session_id)
        return pb.ExportSessionResponse(data=data, session=convert.session_to_pb(info))

    async def ImportSession(self, request: pb.ImportSessionRequest, context) -> pb.Session:
        if not request.data:
            raise InvalidArgument(field="data", value=b"", allowed="the bytes of an ExportSession answer")
        return convert.session_to_pb(await self._sessions.import_(request.data, request.ttl_seconds))

    async def Converse(self, request_iterator, context) -> AsyncIterator[pb.ConverseResponse]:
        stream_id = request_id_var.get()

        async def run_operation(request: pb.ConverseRequest):
            operation = request.WhichOneof("operation")
            if operation is None:
                raise InvalidArgument(field="operation", value=None, allowed="one of create_session, feed, "
                                      "generate, fork, get, close")
            message = getattr(request, operation)
            if operation == "generate":
                # One message per engine step, events taken one at a time: the .done answer is queued before
                # the answers of the session's next operations (see server.sessions.generation).
                request_id = f"{stream_id}/{request.request_tag}"[:128]
                async for response in self._generate_in_session(message, request_id, _one_at_a_time):
                    yield operation, response
                return
            if operation == "get":
                yield operation, convert.session_to_pb(
                    await self._sessions.get(message.session_id, generation_included=True))
                return
            handler = {"create_session": self.CreateSession, "feed": self.Feed, "fork": self.ForkSession,
                       "close": self.CloseSession}[operation]
            yield operation, await handler(message, None)

        async for response in converse(request_iterator, run_operation):
            yield response

    async def _generate_in_session(self, request: pb.GenerateInSessionRequest, request_id: str, batches
                                   ) -> AsyncIterator[pb.GenerateResponse]:
        arrived = time.perf_counter()
        params = convert.params_from_pb(request.options, self._limits, single_result=True)
        priority = convert.priority_from_pb(request.priority, self._limits)
        await self._sessions.ensure(request.session_id)  # no wait for a session this process knows
        generation = self._sessions.generate(request.session_id, params,
                                             leave_unchanged=request.leave_session_unchanged,
                                             request_id=request.request_id or request_id,
                                             retry_id=request.request_id, priority=priority)
        try:
            try:
                model = ServedModel(await generation.ready())
            except InvalidArgument as error:  # its constraint, compiled for the session's model
                raise edge_error(error, "options") from None
            async for item in self._chunks(generation, model, TokenLog(), arrived, pb.GenerateResponse,
                                           batches=batches):
                if not isinstance(item, FinishEvent):
                    yield item  # a chunk
                    continue
                yield pb.GenerateResponse(done=model.generation_done(
                    item, params.stop, 0, session_tokens_consumed=generation.tokens_consumed or 0))
        finally:
            generation.cancel()  # a no-op once it finished; else the tokens so far stay in the session

    # --- helpers ---------------------------------------------------------------------------------------

    def _ready_batches(self, stream) -> AsyncIterator[list]:
        return ready_batches(stream, self._stream_interval)

    async def _model(self, name: str, version: int, rpc: str) -> ServedModel:
        name, version = _checked_name(name, version)
        engine = await self._registry.get(name, version)
        model = ServedModel(engine)
        kind = _KIND_OF_RPC[rpc]
        if model.kind != kind:
            hint = " (use Generate)" if model.kind == ModelKind.MODEL_KIND_LM else " (use Translate)"
            raise FailedPrecondition(f"{rpc} needs a {_kind_name(kind)} model; {model.name} v{model.version} "
                                     f"is a {_kind_name(model.kind)} model{hint}")
        return model

    async def _chunks(self, stream, model: ServedModel, tokens: TokenLog, arrived: float, response_type,
                      send_tokens: bool = True, batches=None) -> AsyncIterator:
        """Responses (of `response_type`) carrying a TokenChunk of the stream's tokens (coalesced when
        several are ready), then the stream's FinishEvent.

        `arrived` (perf_counter) is when the call came in: time to first token counts from there.
        `batches` groups the events (default: whatever piled up, at once).
        """
        previous = arrived
        observe, name, perf_counter = self._observe_tokens, model.name, time.perf_counter
        async for events in (batches or ready_batches)(stream):
            if len(events) == 1:  # the usual: one engine step's tokens (or the finish event alone)
                token_events = events if isinstance(events[0], TokenEvent) else ()
            else:
                token_events = [event for event in events if isinstance(event, TokenEvent)]
            if token_events:
                first_index = len(tokens.ids)
                for event in token_events:
                    tokens.add(event)
                if send_tokens:
                    response = response_type()
                    chunk = response.chunk
                    chunk.SetInParent()
                    model.chunk(token_events, first_index, chunk)  # filled in place: no copy of the chunk
                    now = perf_counter()
                    observe(name, None if first_index == 0 else now - previous, now - arrived)
                    previous = now
                    yield response
            for event in events:
                if isinstance(event, FinishEvent):
                    yield event


async def _collect(stream) -> tuple[FinishEvent, TokenLog]:
    tokens = TokenLog()
    async for event in stream:
        if isinstance(event, TokenEvent):
            tokens.add(event)
        else:
            return event, tokens
    raise SeqserveError(f"request {stream.request_id} ended without a result")  # INTERNAL: an engine bug


async def ready_batches(stream, interval: float = 0.0) -> AsyncIterator[list]:
    """The stream's events in lists: whatever was ready when the consumer came back for more.

    The engine queues its events on the stream as it produces them; the consumer (the gRPC writer, held
    back by flow control) takes everything that piled up at once (`stream.next_batch()`). With `interval`
    (seconds) it comes back no sooner than that after its last take, unless the stream ended meanwhile
    (`stream.hold`): at most one message per interval, the last one never held. Leaving early (client
    gone) cancels the engine request.
    """
    loop = asyncio.get_running_loop()
    try:
        while True:
            events = await stream.next_batch()
            if not events:
                return
            taken = loop.time()
            yield events
            if interval:
                await stream.hold(taken + interval)
    finally:
        stream.cancel()


async def _one_at_a_time(stream) -> AsyncIterator[list]:
    """The stream's events one by one, uncoalesced: a FinishEvent is taken only once the answers before it
    are out (leaving early cancels the stream)."""
    try:
        async for event in stream:
            yield [event]
    finally:
        stream.cancel()


def _checked_name(name: str, version: int) -> tuple[str, int]:
    if not name or len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(field="model", value=name,
                              allowed=f"a model name of 1 to {MAX_NAME_CHARS} characters (ListModels lists them)")
    if version < 0:
        raise InvalidArgument(field="version", value=version, allowed=">= 0 (0 = the latest)")
    return name, version


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _raise_if_deadline(finish: FinishEvent, context) -> None:
    """A request the engine cut short because its deadline passed is DEADLINE_EXCEEDED, not a result."""
    remaining = context.time_remaining()
    if convert.finish_reason_to_pb(finish.reason) == pb.FINISH_REASON_CANCELLED and remaining is not None \
            and remaining <= 0:
        raise DeadlineExceeded(f"the deadline passed after {len(finish.generated_ids)} generated tokens")


def _kind_name(kind: int) -> str:
    return {ModelKind.MODEL_KIND_LM: "language", ModelKind.MODEL_KIND_SEQ2SEQ: "seq2seq"}.get(kind, "unknown")
