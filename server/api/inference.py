"""The Open Inference Protocol (KServe v2 / Triton gRPC, `inference.GRPCInferenceService`) on seqserve's engines.

The same registry, engines and session manager as the native servicer, so the answers are the native
ones: a seq2seq model's ModelInfer is a Translate of a batch of TEXT sources (best TEXT and SCORE per
source, or [n, n_best] of them); a language model's is one Generate of its TEXT prompt, whole with
ModelInfer, one response per chunk with ModelStreamInfer (Triton's decoupled convention: the last carries
`triton_final_response: true`). Triton sequences are sessions: `sequence_start` opens one with the TEXT as
its prefix, later requests feed their TEXT, `max_new_tokens` > 0 generates (and the continuation joins the
session), `sequence_end` closes it. Errors are the native domain errors; `StatusInterceptor` maps them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import metadata

import grpc
from google.protobuf import message_factory

import seqserve.inference as oip
from seqserve.v1.manifest_pb2 import ModelKind
from server.api import inference_convert as tensors
from server.api.constraints import check_constraint, edge_error
from server.api.errors import request_id_var
from server.api.multiplex import multiplex
from server.api.served_model import ServedModel
from server.api.status import status_of
from server.decoding import FinishReason
from server.decoding.limits import RequestLimits
from server.engine.requests import FinishEvent, GenerationRequest, TokenEvent, TranslationRequest
from server.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, SeqserveError
from server.sessions import SessionManager
from server.sessions.ordering import SessionLine, Turn
from server.sessions.sequences import SequenceKey, SequenceMap

logger = logging.getLogger(__name__)

# Protocol extensions this server implements (ServerMetadata): model_repository is left out because
# RepositoryModelLoad / Unload are not served (the repository is polled instead).
EXTENSIONS = ("model_configuration", "sequence", "parameters", "statistics")
_SEQ2SEQ_OUTPUTS = (tensors.TEXT, tensors.SCORE)
_LM_OUTPUTS = (tensors.TEXT,)


def add_to_server(servicer: InferenceServicer, server) -> None:
    """Register `servicer` for every method of `inference.GRPCInferenceService` our proto declares."""
    handlers = {}
    for method in oip.SERVICE.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        make = grpc.stream_stream_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=request.FromString,
                                     response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(oip.SERVICE_NAME, handlers),))


@dataclass
class _Stats:
    """One model version's counters for ModelStatistics."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    inferences: int = 0
    last_ms: int = 0


class InferenceServicer:
    """Answers `inference.GRPCInferenceService` from the engines of `registry` and the sessions of `sessions`."""

    def __init__(self, registry, limits: RequestLimits, *, sessions: SessionManager,
                 sequences: SequenceMap | None = None,
                 observe_tokens: Callable[[str, float | None, float], None] | None = None,
                 stream_interval: float = 0.0):
        self._registry = registry
        self._stream_interval = stream_interval  # seconds between a streamed generation's responses (0: none)
        self._limits = limits
        self._sessions = sessions
        self._observe_tokens = observe_tokens or (lambda *args: None)
        self._sequences = sequences if sequences is not None else SequenceMap()  # (model, id) -> session id
        self._lines: dict[SequenceKey, SessionLine] = {}  # a sequence's requests here, one after another
        self._stats: dict[tuple[str, int], _Stats] = {}

    # --- health and metadata ------------------------------------------------------------------------

    async def ServerLive(self, request, context):
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        if not self._registry.started:  # (an API process whose engine process is away): not ready, not an error
            return oip.ServerReadyResponse(ready=False)
        statuses = self._registry.models()
        return oip.ServerReadyResponse(ready=bool(statuses and all(s.serving_version is not None for s in statuses)))

    async def ModelReady(self, request, context):
        version = _version(request.version, "version")
        if not self._registry.started:
            return oip.ModelReadyResponse(ready=False)
        status = next((s for s in self._registry.models() if s.name == request.name), None)
        if status is None:
            return oip.ModelReadyResponse(ready=False)
        ready = status.serving_version is not None if version == 0 else version in status.loaded_versions
        return oip.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        return oip.ServerMetadataResponse(name="seqserve", version=_server_version(), extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        model = await self._model(request.name, request.version, "version")
        status = next(s for s in self._registry.models() if s.name == model.name)
        response = oip.ModelMetadataResponse(name=model.name, versions=[str(v) for v in status.versions],
                                             platform=_platform(model))
        # As Triton derives it from ModelConfig: a batched model's shapes lead with the batch dimension (-1).
        # A seq2seq request sends [n, 1] (what perf_analyzer sends) or just [n]; outputs are [n, n_best]
        # ([n] for a [n] request with n_best 1).
        if model.kind == ModelKind.MODEL_KIND_LM:
            response.inputs.add(name=tensors.TEXT, datatype=tensors.BYTES, shape=[1])
            response.outputs.add(name=tensors.TEXT, datatype=tensors.BYTES, shape=[1])
        else:
            response.inputs.add(name=tensors.TEXT, datatype=tensors.BYTES, shape=[-1, 1])
            response.outputs.add(name=tensors.TEXT, datatype=tensors.BYTES, shape=[-1, -1])
            response.outputs.add(name=tensors.SCORE, datatype=tensors.FP32, shape=[-1, -1])
        return response

    async def ModelConfig(self, request, context):
        model = await self._model(request.name, request.version, "version")
        config = oip.ModelConfig(name=model.name, platform=_platform(model), backend="seqserve")
        string, fp32 = oip.data_type("TYPE_STRING"), oip.data_type("TYPE_FP32")
        if model.kind == ModelKind.MODEL_KIND_LM:
            # One prompt per request; sequences are sessions; generations stream (decoupled).
            config.max_batch_size = 0
            config.input.add(name=tensors.TEXT, data_type=string, dims=[1])
            config.output.add(name=tensors.TEXT, data_type=string, dims=[1])
            ttl = self._sessions.limits.default_ttl_seconds
            config.sequence_batching.max_sequence_idle_microseconds = int(ttl * 1_000_000)
            config.model_transaction_policy.decoupled = True
        else:
            # A batch of sources per request (the first, batch, dimension is left out of dims).
            config.max_batch_size = self._limits.max_sources
            config.input.add(name=tensors.TEXT, data_type=string, dims=[1])
            config.output.add(name=tensors.TEXT, data_type=string, dims=[-1])
            config.output.add(name=tensors.SCORE, data_type=fp32, dims=[-1])
            config.dynamic_batching.SetInParent()
        spec = model.bundle.spec
        config.parameters["kind"].string_value = spec.kind.value
        config.parameters["cell"].string_value = spec.cell
        config.parameters["version"].string_value = str(model.version)
        return oip.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        version = _version(request.version, "version")
        statuses = self._registry.models()
        if request.name and not any(s.name == request.name for s in statuses):
            raise NotFound(f"unknown model {request.name!r}; RepositoryIndex lists the models of this server")
        response = oip.ModelStatisticsResponse()
        for status in statuses:
            if request.name and status.name != request.name:
                continue
            for number in status.versions:
                if version and number != version:
                    continue
                stats = self._stats.get((status.name, number), _Stats())
                entry = response.model_stats.add(name=status.name, version=str(number), last_inference=stats.last_ms,
                                                  inference_count=stats.inferences,
                                                  execution_count=stats.success + stats.fail)
                entry.inference_stats.success.count, entry.inference_stats.success.ns = stats.success, stats.success_ns
                entry.inference_stats.fail.count, entry.inference_stats.fail.ns = stats.fail, stats.fail_ns
                entry.inference_stats.queue.count = stats.success + stats.fail  # every request is queued once
        return response

    async def RepositoryIndex(self, request, context):
        response = oip.RepositoryIndexResponse()
        for status in self._registry.models():
            for number in status.versions:
                loaded = number in status.loaded_versions
                if request.ready and not loaded:
                    continue
                response.models.add(name=status.name, version=str(number), state="READY" if loaded else "UNAVAILABLE",
                                    reason="" if loaded else "not loaded (a request naming this version loads it)")
        return response

    # --- inference ------------------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        """One response: a generation's chunks are joined (its text is the whole continuation)."""
        responses = [response async for response in self._infer(request, _deadline(context), streaming=False)]
        return responses[-1]

    async def ModelStreamInfer(self, requests, context) -> AsyncIterator:
        """Every request runs as it arrives (a sequence's requests one after another, in order); a failed
        request is answered with error_message and the stream goes on."""
        deadline = _deadline(context)

        async def answer(request, put) -> None:
            try:
                async for response in self._infer(request, deadline, streaming=True):
                    put(oip.ModelStreamInferResponse(infer_response=response))
            except Exception as error:  # noqa: BLE001 - answered on the stream, which goes on
                if not isinstance(error, SeqserveError) or error.code in ("INTERNAL", "UNKNOWN"):
                    logger.error("ModelStreamInfer request %r failed", request.id, exc_info=error)
                status = status_of(error)
                put(oip.ModelStreamInferResponse(
                    error_message=f"[StatusCode.{status.code.name}] {status.details}",
                    infer_response=oip.ModelInferResponse(model_name=request.model_name, id=request.id)))

        async for response in multiplex(requests, lambda request: functools.partial(answer, request),
                                        lambda request: f"ModelStreamInfer {request.id}"):
            yield response

    async def _infer(self, request, deadline: float | None, *, streaming: bool) -> AsyncIterator:
        """The responses of one inference request (one, or a generation's chunks and then its last)."""
        started = time.perf_counter()
        parameters = tensors.parameters_from_pb(request.parameters)
        sequence = parameters.sequence
        # A sequence's requests take their turn now, in arrival order, before anything awaits.
        turn = self._join((request.model_name, sequence.id)) if sequence is not None else None
        model, inferences = None, 1
        try:
            if turn is not None:
                await turn.wait()
            model = await self._model(request.model_name, request.model_version, "model_version")
            if model.kind == ModelKind.MODEL_KIND_LM:
                outputs = tensors.requested_outputs(request, _LM_OUTPUTS)
                (prompt,), _ = tensors.text_input(request, max_items=1, one=True)
                if sequence is not None:
                    responses = self._sequence(model, request, parameters, prompt, deadline, streaming)
                else:
                    params = parameters.decoding_params(self._limits, single_result=True)
                    priority = parameters.priority(self._limits)
                    prompt_ids = await model.encode_prompt(prompt)
                    await check_constraint(model, params, self._limits, where="parameters", context_ids=prompt_ids)
                    stream = model.engine.submit(GenerationRequest(_request_id(request), prompt_ids, params,
                                                                   deadline=deadline, priority=priority))
                    responses = self._generation(model, request, stream, deadline, streaming, started)
                async for response in responses:
                    _keep_outputs(response, outputs)
                    yield response
            else:
                if sequence is not None:
                    raise FailedPrecondition(f"sequences need a language model; {model.name} v{model.version} is a "
                                             "seq2seq model (send its requests without sequence_id)")
                response = await self._translate(model, request, parameters, deadline)
                inferences = int(response.outputs[0].shape[0]) if response.outputs else 1
                yield response
        except BaseException:
            self._count(model, request, started, ok=False, inferences=0)
            raise
        finally:
            if turn is not None:
                turn.release()
        self._count(model, request, started, ok=True, inferences=inferences)

    async def _translate(self, model: ServedModel, request, parameters: tensors.InferParameters,
                         deadline: float | None):
        outputs = tensors.requested_outputs(request, _SEQ2SEQ_OUTPUTS)
        sources, shape = tensors.text_input(request, max_items=self._limits.max_sources, one=False)
        params = parameters.decoding_params(self._limits, single_result=False)
        await check_constraint(model, params, self._limits, where="parameters")
        priority = parameters.priority(self._limits)
        for index, text in enumerate(sources):  # every check first: nothing is tokenized when one is refused
            if not text.strip():
                raise InvalidArgument(field=f"{tensors.TEXT}[{index}]", value=text, allowed="a non-empty text")
            model.check_source_chars(text, f"{tensors.TEXT}[{index}]")
        encoded = [await model.encode_source(text, f"{tensors.TEXT}[{index}]") for index, text in enumerate(sources)]
        streams = []
        try:
            for index, source_ids in enumerate(encoded):
                streams.append(model.engine.submit(TranslationRequest(f"{_request_id(request)}/{index}", source_ids,
                                                                      params, False, deadline, priority)))
            finishes = await asyncio.gather(*(stream.result() for stream in streams))
        finally:
            for stream in streams:
                stream.cancel()
        n_best = params.n_best
        texts, scores = [], []
        for finish in finishes:
            _raise_if_deadline(finish, deadline)
            decoded = finish.texts or [finish.text]
            for index in range(n_best):
                if index < len(finish.hypotheses):
                    hypothesis = finish.hypotheses[index]
                    texts.append(decoded[index] if index < len(decoded)
                                 else model.bundle.tokenizer("target").decode(list(hypothesis.tokens)))
                    scores.append(float(hypothesis.score))
                else:  # fewer finished hypotheses than asked for
                    texts.append("")
                    scores.append(float("-inf"))
        out_shape = [len(sources)] if n_best == 1 and len(shape) == 1 else [len(sources), n_best]
        response = self._response(model, request)
        if tensors.TEXT in outputs:
            tensors.add_text_output(response, texts, out_shape)
        if tensors.SCORE in outputs:
            tensors.add_score_output(response, scores, out_shape)
        return response

    async def _generation(self, model: ServedModel, request, stream, deadline: float | None, streaming: bool,
                          started: float) -> AsyncIterator:
        """A generation's responses: with `streaming`, one per batch of ready tokens, then the last (any text
        not yet sent, finish_reason, triton_final_response); else only the last, with the whole text."""
        sent, previous, first = [], started, True
        try:
            while True:
                events = await stream.next_batch()
                if not events:
                    raise SeqserveError(f"generation {request.id or request_id_var.get()} ended without a result")
                tokens = [event for event in events if isinstance(event, TokenEvent)]
                if tokens and streaming:
                    text = "".join(event.text for event in tokens)
                    now = time.perf_counter()
                    self._observe_tokens(model.name, None if first else now - previous, now - started)
                    previous, first = now, False
                    sent.append(text)
                    response = self._response(model, request)
                    tensors.add_text_output(response, [text], [1])
                    tensors.set_parameter(response, tensors.FINAL_RESPONSE, False)
                    taken = asyncio.get_running_loop().time()
                    yield response
                    if self._stream_interval:
                        await stream.hold(taken + self._stream_interval)
                finish = next((event for event in events if isinstance(event, FinishEvent)), None)
                if finish is not None:
                    break
        finally:
            stream.cancel()  # a no-op once finished; else the engine frees the rows (or parks the session's)
        _raise_if_deadline(finish, deadline)
        so_far = "".join(sent)
        rest = finish.text[len(so_far):] if finish.text.startswith(so_far) else ""
        response = self._response(model, request)
        tensors.add_text_output(response, [rest if streaming else finish.text], [1])
        tensors.set_parameter(response, "finish_reason", FinishReason(finish.reason).value)
        tensors.set_parameter(response, "generated_tokens", len(finish.generated_ids))
        if streaming:
            tensors.set_parameter(response, tensors.FINAL_RESPONSE, True)
        yield response

    async def _sequence(self, model: ServedModel, request, parameters: tensors.InferParameters, text: str,
                        deadline: float | None, streaming: bool) -> AsyncIterator:
        """One request of a Triton sequence: open (start) or feed the session, generate if asked, close (end)."""
        sequence = parameters.sequence
        key = (model.name, sequence.id)
        started = time.perf_counter()
        params = None
        priority = parameters.priority(self._limits)
        if parameters.options.max_new_tokens > 0:
            params = parameters.decoding_params(self._limits, single_result=True)
            await check_constraint(model, params, self._limits, where="parameters")  # exact: at the generation
        elif "max_new_tokens" in parameters.given and parameters.options.max_new_tokens < 0:
            raise InvalidArgument(field="parameters.max_new_tokens", value=parameters.options.max_new_tokens,
                                  allowed=f"0 (feed only) to {self._limits.max_new_tokens}")
        if sequence.start:
            old = await self._sequences.pop(key)
            if old is not None:  # the id starts over: the old session ends (Triton's sequence batcher does too)
                await _quietly(self._sessions.close(old))
            info = await self._sessions.create(model.name, model.version, text)
            session_id = info.session_id
            await self._sequences.put(key, session_id)
        else:
            session_id = await self._sequences.get(key)
            if session_id is None:
                raise NotFound(f"sequence_id {sequence.id!r} of model {model.name!r} is unknown: it was never started "
                               "(send sequence_start = true first) or it has ended (sequence_end)")
            try:
                await self._sessions.feed(session_id, text)
            except NotFound as error:  # expired or evicted: say so, and forget the id
                await self._sequences.pop(key, session_id)
                raise NotFound(f"sequence_id {sequence.id!r} of model {model.name!r} has ended: {error.message}; "
                               "start it again with sequence_start = true") from None
        try:
            if params is not None:
                generation = self._sessions.generate(session_id, params, request_id=_request_id(request),
                                                     priority=priority)
                try:
                    await generation.ready()
                except InvalidArgument as error:  # its constraint, compiled for the session's own text
                    raise edge_error(error, "parameters") from None
                async for response in self._generation(model, request, generation, deadline, streaming, started):
                    tensors.set_parameter(response, "sequence_id", str(sequence.id))
                    yield response
            else:
                response = self._response(model, request)
                tensors.add_text_output(response, [""], [1])
                if streaming:
                    tensors.set_parameter(response, tensors.FINAL_RESPONSE, True)
                yield response
        finally:
            if sequence.end and await self._sequences.pop(key, session_id) is not None:
                await _quietly(self._sessions.close(session_id))

    # --- helpers ----------------------------------------------------------------------------------------

    async def _model(self, name: str, version: str, version_field: str) -> ServedModel:
        if not name:
            raise InvalidArgument(field="model_name" if version_field == "model_version" else "name", value=name,
                                  allowed="a model name (RepositoryIndex lists them)")
        return ServedModel(await self._registry.get(name, _version(version, version_field)))

    def _response(self, model: ServedModel, request):
        return oip.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)

    def _join(self, key: SequenceKey) -> Turn:
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = SessionLine()

        def forget_idle() -> None:
            if not line.busy and self._lines.get(key) is line:
                del self._lines[key]

        return line.join(on_release=forget_idle)

    def _count(self, model: ServedModel | None, request, started: float, *, ok: bool, inferences: int) -> None:
        if model is None:
            return
        stats = self._stats.setdefault((model.name, model.version), _Stats())
        elapsed = int((time.perf_counter() - started) * 1e9)
        if ok:
            stats.success += 1
            stats.success_ns += elapsed
            stats.inferences += inferences
            stats.last_ms = int(time.time() * 1000)
        else:
            stats.fail += 1
            stats.fail_ns += elapsed


def _keep_outputs(response, names: tuple[str, ...]) -> None:
    if all(tensor.name in names for tensor in response.outputs):
        return
    kept = [(t, raw) for t, raw in zip(response.outputs, response.raw_output_contents, strict=True) if t.name in names]
    outputs = [type(t)() for t, _ in kept]
    for copy, (tensor, _) in zip(outputs, kept, strict=True):
        copy.CopyFrom(tensor)
    del response.outputs[:]
    del response.raw_output_contents[:]
    response.outputs.extend(outputs)
    response.raw_output_contents.extend(raw for _, raw in kept)


def _request_id(request) -> str:
    """The call's request id, with the client's id of this request when it gave one (a stream has many)."""
    return f"{request_id_var.get()}/{request.id}"[:128] if request.id else request_id_var.get()


def _version(text: str, field: str) -> int:
    if not text:
        return 0
    if not text.isdigit() or int(text) == 0:
        raise InvalidArgument(field=field, value=text, allowed='a positive integer, or "" for the latest')
    return int(text)


def _platform(model: ServedModel) -> str:
    return "seqserve_lm" if model.kind == ModelKind.MODEL_KIND_LM else "seqserve_seq2seq"


def _server_version() -> str:
    try:
        return metadata.version("seqserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _raise_if_deadline(finish: FinishEvent, deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline and FinishReason(finish.reason) == FinishReason.CANCELLED:
        raise DeadlineExceeded(f"the deadline passed after {len(finish.generated_ids)} generated tokens")


async def _quietly(closing) -> None:
    """Close a session whose end no one waits to hear about (it may have expired already)."""
    try:
        await closing
    except SeqserveError:
        pass
