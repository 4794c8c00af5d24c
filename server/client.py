"""`seqserve client`: call a running server from a shell or a script.

    seqserve client [--target HOST:PORT] models [--model NAME [--version N]] [--json]
    seqserve client translate [--model NAME] [--stream] [decoding options] TEXT...
    seqserve client generate [--model NAME] [decoding options] TEXT...
    seqserve client session create|feed|generate|fork|get|close|export|import ...

`--model` may be left out when the server has exactly one model of the kind the command needs.
`generate` writes text to stdout as it arrives. With `--json` every answer is one JSON object per line.
A failed call exits 1 and prints the status code name and the server's message ("INVALID_ARGUMENT:
options.top_p must be in (0, 1], got 1.5"); a usage error exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import uuid

import grpc
from google.protobuf import json_format
from grpc_status import rpc_status

from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc
from seqserve.v1.manifest_pb2 import ModelKind

DEFAULT_TARGET = "127.0.0.1:50051"
SESSION_ID_METADATA = "x-session-id"  # sent with every call on a session, for a balancer to hash on
# A call on a session refused with UNAVAILABLE (a draining replica, a balancer between replicas) is sent
# again: behind nginx it reaches the next replica once the draining one has closed. Feed and generate
# carry a request_id, so a retried one is applied once.
RETRY_UNAVAILABLE = json.dumps({"methodConfig": [{
    "name": [{"service": "seqserve.v1.Seqserve", "method": method} for method in (
        "Feed", "GenerateInSession", "ForkSession", "GetSession", "CloseSession", "ExportSession")],
    "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.25s", "maxBackoff": "1s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]}}]})
# A call on a session that a dying process cut (a replica behind a balancer, one of a server's processes)
# reaches a client as UNAVAILABLE, or through nginx as UNKNOWN or INTERNAL with a transport's words
# ("Stream removed", ...); ABORTED says another replica won a race. Feed and GenerateInSession carry a
# request_id, so the server applies them once however often they are sent: they are sent again on those,
# for up to RETRY_SECONDS (a restarting engine process takes a few), and GetSession and ExportSession
# (reads) too. docs/sessions.md lists the codes for other clients.
RETRY_SECONDS = 30.0
CUT_CALL = re.compile(r"stream removed|socket closed|connection reset|rst_stream|broken pipe|goaway", re.I)
EXIT_FAILED_CALL = 1
EXIT_USAGE = 2
_SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "seed")


class ClientError(Exception):
    """A failure to report as `CODE: message` and exit 1 (a failed call, or a check done before it)."""

    def __init__(self, code: str, message: str, details: list | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.details = code, message, details or []


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS keeps a flag given before the command from being reset by the subparser's default.
    common.add_argument("--target", default=argparse.SUPPRESS,
                        help=f"server address (default $SEQSERVE_TARGET or {DEFAULT_TARGET})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print answers as JSON, one object per line")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="deadline in seconds")
    common.add_argument("--token", default=argparse.SUPPRESS,
                        help="bearer token when the server has auth on (default $SEQSERVE_AUTH_TOKEN)")
    common.add_argument("--request-id", default=argparse.SUPPRESS, help="id shown in the server's logs")
    common.add_argument("--tls-ca", default=argparse.SUPPRESS,
                        help="connect over TLS, trusting this PEM CA bundle (default $SEQSERVE_TLS_CA; "
                             "'system' trusts the system's roots)")
    common.add_argument("--tls-cert", default=argparse.SUPPRESS,
                        help="client certificate (PEM) for a server that requires one (default $SEQSERVE_TLS_CERT)")
    common.add_argument("--tls-key", default=argparse.SUPPRESS,
                        help="private key (PEM) of --tls-cert (default $SEQSERVE_TLS_KEY)")

    parser = argparse.ArgumentParser(prog="seqserve client", parents=[common],
                                     description="Call a running seqserve server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models = commands.add_parser("models", parents=[common], help="list models, or describe one with --model")
    models.add_argument("--model", help="describe this model (GetModel) instead of listing")
    models.add_argument("--version", type=int, default=0, help="version to describe (default: latest)")

    for name, help_ in (("translate", "translate TEXT (one source per argument)"),
                        ("generate", "continue the prompt TEXT (arguments joined by spaces)")):
        command = commands.add_parser(name, parents=[common], help=help_)
        command.add_argument("--model", help="model name (optional if only one model fits)")
        command.add_argument("--version", type=int, default=0, help="model version (default: latest)")
        _add_decoding_flags(command)
        if name == "translate":
            command.add_argument("--stream", action="store_true", help="stream tokens (TranslateStream)")
            command.add_argument("--attention", action="store_true", help="return attention weights")
        command.add_argument("text", nargs="*" if name == "generate" else "+", metavar="TEXT")
    _add_session_parser(commands, common)
    return parser


def _add_session_parser(commands, common: argparse.ArgumentParser) -> None:
    """`seqserve client session create|feed|generate|fork|get|close ...`: one call per invocation."""
    session = commands.add_parser("session", parents=[common], help="stateful sessions kept on the server")
    actions = session.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", parents=[common], help="open a session; prints its id")
    create.add_argument("--model", help="LM name (optional if the server has one LM)")
    create.add_argument("--version", type=int, default=0, help="model version (default: latest)")
    create.add_argument("--ttl", type=int, default=0, help="idle seconds before expiry (0 = server default)")
    create.add_argument("prefix", nargs="*", metavar="TEXT", help="text fed at creation")
    feed = actions.add_parser("feed", parents=[common], help="append TEXT to the session")
    feed.add_argument("--log-probs", action="store_true", help="print each fed token's log-prob")
    generate = actions.add_parser("generate", parents=[common], help="continue the session (streams)")
    generate.add_argument("--leave-unchanged", action="store_true",
                          help="do not add the generated text to the session")
    _add_decoding_flags(generate)
    for name, help_ in (("fork", "copy the session into a new one; prints the new id"),
                        ("get", "describe the session"), ("close", "close the session")):
        actions.add_parser(name, parents=[common], help=help_)
    export = actions.add_parser("export", parents=[common],
                                help="write the session as bytes another server can import")
    export.add_argument("--output", "-o", default="-", help="file to write (default: stdout)")
    import_ = actions.add_parser("import", parents=[common],
                                 help="open a session from exported bytes; prints the new id")
    import_.add_argument("--ttl", type=int, default=0, help="idle seconds before expiry (0 = the exported TTL)")
    import_.add_argument("input", metavar="FILE", help="exported bytes ('-' = stdin)")
    for action in (feed, generate, export, *(actions.choices[n] for n in ("fork", "get", "close"))):
        action.add_argument("session_id", metavar="SESSION_ID")
    feed.add_argument("text", nargs="+", metavar="TEXT")


def _add_decoding_flags(command: argparse.ArgumentParser) -> None:
    group = command.add_argument_group("decoding options (unset = the server's defaults)")
    group.add_argument("--strategy", choices=("greedy", "sample", "beam"),
                       help="default: beam if --beam-size is given, sample if a sampling flag is, else greedy")
    group.add_argument("--max-new-tokens", type=int)
    group.add_argument("--min-new-tokens", type=int)
    group.add_argument("--temperature", type=float)
    group.add_argument("--top-k", type=int)
    group.add_argument("--top-p", type=float)
    group.add_argument("--seed", type=int)
    group.add_argument("--beam-size", type=int)
    group.add_argument("--n-best", type=int)
    group.add_argument("--length-penalty", type=float)
    group.add_argument("--early-stopping", action="store_true")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--repetition-penalty", type=float)
    group.add_argument("--no-repeat-ngram-size", type=int)
    group.add_argument("--log-probs", action="store_true", help="return each token's log-probability")
    group.add_argument("--top-log-probs", type=int, help="return this many alternatives per token")
    constraint = group.add_mutually_exclusive_group()
    constraint.add_argument("--regex", help="the output text must match this regular expression")
    constraint.add_argument("--choice", action="append", help="the output text is one of these (repeatable)")
    constraint.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid for this schema file")
    constraint.add_argument("--grammar", metavar="FILE", help="the output follows this Lark grammar file")
    command.add_argument("--priority", type=int, default=0,
                         help="scheduling priority: higher runs sooner and may park lower ones (default 0)")


def decoding_options(args: argparse.Namespace) -> pb.DecodingOptions:
    """DecodingOptions from the flags; unset flags stay unset so the server's defaults apply."""
    strategy = args.strategy
    if strategy is None:
        if args.beam_size is not None or args.n_best is not None:
            strategy = "beam"
        elif any(getattr(args, flag) is not None for flag in _SAMPLING_FLAGS):
            strategy = "sample"
        else:
            strategy = "greedy"
    options = pb.DecodingOptions(strategy=pb.DecodingOptions.Strategy.Value(f"STRATEGY_{strategy.upper()}"),
                                 stop=args.stop, early_stopping=args.early_stopping,
                                 return_log_probs=args.log_probs)
    for flag in ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "seed", "beam_size",
                 "n_best", "length_penalty", "repetition_penalty", "no_repeat_ngram_size"):
        value = getattr(args, flag)
        if value is not None:
            try:
                setattr(options, flag, value)
            except ValueError as error:  # e.g. a negative seed into a uint64
                raise ClientError("INVALID_ARGUMENT", f"--{flag.replace('_', '-')}: {error}") from None
    if args.top_log_probs is not None:
        options.top_log_probs = args.top_log_probs
    if args.regex is not None:
        options.constraint.regex = args.regex
    elif args.choice:
        options.constraint.choice.values.extend(args.choice)
    elif args.json_schema is not None or args.grammar is not None:
        flag, path = ("json-schema", args.json_schema) if args.json_schema is not None else ("grammar", args.grammar)
        try:
            text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
        except OSError as error:
            raise ClientError("INVALID_ARGUMENT", f"--{flag} {path} cannot be read: {error.strerror}") from None
        setattr(options.constraint, flag.replace("-", "_"), text)
    return options


def channel_credentials(ca: str | None, cert: str | None, key: str | None) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM files (None for a plain-text channel). `ca` "system" uses the system's roots;
    `cert` and `key` (both or neither) are the client's own, for a server that requires mutual TLS."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ClientError("INVALID_ARGUMENT", "--tls-cert and --tls-key go together (both or neither)")

    def read(flag: str, path: str) -> bytes:
        try:
            return open(path, "rb").read()
        except OSError as error:
            raise ClientError("INVALID_ARGUMENT", f"--{flag} {path} cannot be read: {error.strerror}") from None

    roots = None if ca in (None, "", "system") else read("tls-ca", ca)
    return grpc.ssl_channel_credentials(root_certificates=roots,
                                        private_key=read("tls-key", key) if key else None,
                                        certificate_chain=read("tls-cert", cert) if cert else None)


class Client:
    """One channel to the server and the calls the commands make."""

    def __init__(self, target: str, timeout: float | None = None, token: str | None = None,
                 request_id: str | None = None, credentials: grpc.ChannelCredentials | None = None):
        options = [("grpc.enable_retries", 1), ("grpc.service_config", RETRY_UNAVAILABLE)]
        self.channel = (grpc.secure_channel(target, credentials, options=options) if credentials is not None
                        else grpc.insecure_channel(target, options=options))
        self.stub = pb_grpc.SeqserveStub(self.channel)
        self.timeout = timeout
        self.metadata = []
        if token:
            self.metadata.append(("authorization", f"Bearer {token}"))
        self.request_id = request_id or ""

    def call(self, method: str, request):
        metadata = self.metadata
        session_id = getattr(request, "session_id", "")
        if session_id:  # a balancer in front of replicas routes a session's calls by it (deploy/nginx)
            metadata = [*metadata, (SESSION_ID_METADATA, session_id)]
        return getattr(self.stub, method)(request, timeout=self.timeout, metadata=metadata)

    def call_retried(self, method: str, request):
        """`call`, sent again while the answer is a cut call or a lost race (the request must be one the
        server applies at most once: it carries a request_id, or it only reads)."""
        give_up, pause = time.monotonic() + RETRY_SECONDS, 0.1
        while True:
            try:
                return self.call(method, request)
            except grpc.RpcError as error:
                if not retryable(error) or time.monotonic() + pause > give_up:
                    raise
            time.sleep(pause)
            pause = min(2 * pause, 2.0)

    def stream_retried(self, method: str, request):
        """The responses of a streaming call with a request_id, sent again as `call_retried` does: the second
        attempt (the server replays the generation if it applied it, or runs it again from the same session
        if it did not) continues where the first was cut, nothing given out twice. A generation that comes
        out different the second time (sampling without a seed, run again) is an error, not a mix."""
        give_up, pause = time.monotonic() + RETRY_SECONDS, 0.1
        given = _Given()
        while True:
            try:
                for response in self.call(method, request):
                    response = given.rest_of(response)
                    if response is not None:
                        yield response
                return
            except grpc.RpcError as error:
                if not retryable(error) or time.monotonic() + pause > give_up:
                    raise
            given.attempt()
            time.sleep(pause)
            pause = min(2 * pause, 2.0)

    def resolve_model(self, name: str | None, kind: int) -> str:
        """The model to use: `name`, or the only model of `kind` on the server."""
        if name:
            return name
        fitting = [m.name for m in self.call("ListModels", pb.ListModelsRequest()).models if m.kind == kind]
        kind_name = "translation (seq2seq)" if kind == ModelKind.MODEL_KIND_SEQ2SEQ else "language"
        if len(fitting) != 1:
            found = f"several: {', '.join(fitting)}" if fitting else "none"
            raise ClientError("FAILED_PRECONDITION",
                              f"--model is needed unless the server has exactly one {kind_name} model; it has {found}")
        return fitting[0]

    def close(self) -> None:
        self.channel.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) and EXIT_USAGE
    as_json = getattr(args, "json", False)
    try:
        credentials = channel_credentials(*(getattr(args, f"tls_{part}", None)
                                            or os.environ.get(f"SEQSERVE_TLS_{part.upper()}")
                                            for part in ("ca", "cert", "key")))
    except ClientError as error:
        return report(error, as_json)
    client = Client(getattr(args, "target", None) or os.environ.get("SEQSERVE_TARGET") or DEFAULT_TARGET,
                    timeout=getattr(args, "timeout", None),
                    token=getattr(args, "token", None) or os.environ.get("SEQSERVE_AUTH_TOKEN"),
                    request_id=getattr(args, "request_id", None), credentials=credentials)
    try:
        {"models": run_models, "translate": run_translate, "generate": run_generate,
         "session": run_session}[args.command](client, args, as_json)
    except grpc.RpcError as error:
        return report(_from_rpc_error(error), as_json)
    except ClientError as error:
        return report(error, as_json)
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()
    return 0


def run_models(client: Client, args, as_json: bool) -> None:
    if args.model:
        info = client.call("GetModel", pb.GetModelRequest(model=args.model, version=args.version))
        if as_json:
            _print_json(info)
            return
        manifest = info.manifest
        print(f"{info.name} v{info.version} {ModelKind.Name(manifest.kind)} {manifest.cell} "
              f"variant={info.variant} ready={info.ready}")
        print(f"providers: {', '.join(info.providers) or '-'} (asked: {', '.join(info.requested_providers)})")
        for metric, value in sorted(manifest.metrics.items()):
            print(f"{metric}: {value:g}")
        return
    response = client.call("ListModels", pb.ListModelsRequest())
    if as_json:
        _print_json(response)
        return
    for model in response.models:
        print(f"{model.name}\t{ModelKind.Name(model.kind)}\tversions {','.join(map(str, model.versions))}"
              f"\tlatest {model.latest_version}\t{'ready' if model.ready else 'not ready'}")


def run_translate(client: Client, args, as_json: bool) -> None:
    for index, text in enumerate(args.text):
        _check_utf8(f"sources[{index}]", text)
    options = decoding_options(args)
    model = client.resolve_model(args.model, ModelKind.MODEL_KIND_SEQ2SEQ)
    if args.stream:
        for text in args.text:
            request = pb.TranslateStreamRequest(model=model, version=args.version, source=text, options=options,
                                                return_attention=args.attention, request_id=client.request_id,
                                                priority=args.priority)
            _stream(client.call("TranslateStream", request), as_json)
        return
    request = pb.TranslateRequest(model=model, version=args.version, sources=args.text, options=options,
                                  return_attention=args.attention, request_id=client.request_id,
                                  priority=args.priority)
    response = client.call("Translate", request)
    if as_json:
        _print_json(response)
        return
    for translation in response.translations:
        if len(translation.hypotheses) == 1:
            print(translation.hypotheses[0].text)
            continue
        for hypothesis in translation.hypotheses:
            print(f"{hypothesis.score:.4f}\t{hypothesis.text}")
        print()


def run_generate(client: Client, args, as_json: bool) -> None:
    prompt = " ".join(args.text)
    _check_utf8("prompt", prompt)
    options = decoding_options(args)
    model = client.resolve_model(args.model, ModelKind.MODEL_KIND_LM)
    request = pb.GenerateRequest(model=model, version=args.version, prompt=prompt, options=options,
                                 request_id=client.request_id, priority=args.priority)
    _stream(client.call("Generate", request), as_json)


def run_session(client: Client, args, as_json: bool) -> None:
    action = args.action
    if action == "create":
        model = client.resolve_model(args.model, ModelKind.MODEL_KIND_LM)
        prefix = " ".join(args.prefix)
        _check_utf8("prefix", prefix)
        answer = client.call("CreateSession", pb.CreateSessionRequest(
            model=model, version=args.version, prefix=prefix, ttl_seconds=args.ttl))
    elif action == "feed":
        text = " ".join(args.text)
        _check_utf8("text", text)
        answer = client.call_retried("Feed", pb.FeedRequest(session_id=args.session_id, text=text,
                                                            return_log_probs=args.log_probs,
                                                            request_id=client.request_id or uuid.uuid4().hex))
    elif action == "generate":
        request = pb.GenerateInSessionRequest(session_id=args.session_id, options=decoding_options(args),
                                              leave_session_unchanged=args.leave_unchanged,
                                              request_id=client.request_id or uuid.uuid4().hex,
                                              priority=args.priority)
        _stream(client.stream_retried("GenerateInSession", request), as_json)
        return
    elif action == "export":
        answer = client.call_retried("ExportSession", pb.ExportSessionRequest(session_id=args.session_id))
        if args.output == "-":
            sys.stdout.buffer.write(answer.data)
            sys.stdout.flush()
        else:
            with open(args.output, "wb") as handle:
                handle.write(answer.data)
        return
    elif action == "import":
        try:
            if args.input == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(args.input, "rb") as handle:
                    data = handle.read()
        except OSError as error:
            raise ClientError("INVALID_ARGUMENT", f"cannot read {args.input}: {error}") from None
        answer = client.call("ImportSession", pb.ImportSessionRequest(data=data, ttl_seconds=args.ttl))
    else:
        method, message = {"fork": ("ForkSession", pb.ForkSessionRequest),
                           "get": ("GetSession", pb.GetSessionRequest),
                           "close": ("CloseSession", pb.CloseSessionRequest)}[action]
        request = message(session_id=args.session_id)
        answer = client.call_retried(method, request) if action == "get" else client.call(method, request)
    if as_json:
        _print_json(answer)
    elif action in ("create", "fork", "import"):
        print(answer.session_id)
    elif action == "feed" and args.log_probs:
        for item in answer.token_log_probs:
            print(f"{item.log_prob:9.4f}  {item.token!r}")
    else:
        print(answer)


def retryable(error: grpc.RpcError) -> bool:
    """A cut call or a lost race (see CUT_CALL), as opposed to an answer."""
    code = error.code() if hasattr(error, "code") else None
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED):
        return True
    details = error.details() if hasattr(error, "details") else ""
    return code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and bool(CUT_CALL.search(details or ""))


class _Given:
    """What a retried generation stream gave out so far (its text and token ids), so that another attempt
    gives out only the rest."""

    def __init__(self):
        self.text, self.ids = "", []
        self._text, self._ids = "", []  # the current attempt's, from its start

    def attempt(self) -> None:
        self._text, self._ids = "", []

    def rest_of(self, response):
        if response.WhichOneof("event") != "chunk":
            return response
        chunk = response.chunk
        seen_text, seen_ids = len(self._text), len(self._ids)
        self._text += chunk.text
        self._ids += list(chunk.token_ids)
        shared = min(len(self._ids), len(self.ids))
        if self._ids[:shared] != self.ids[:shared] or not (self._text.startswith(self.text)
                                                           or self.text.startswith(self._text)):
            raise ClientError("ABORTED", "the generation was cut and, sent again, came out different (sampling "
                                         "without a seed is drawn anew); its first part was printed above")
        new_ids = max(0, len(self._ids) - max(len(self.ids), seen_ids))
        new_text = self._text[max(len(self.text), seen_text):]
        if not new_ids and not new_text:
            return None
        trimmed = pb.GenerateResponse()
        trimmed.chunk.CopyFrom(chunk)
        skip = len(chunk.token_ids) - new_ids
        del trimmed.chunk.token_ids[:skip]
        del trimmed.chunk.tokens[:skip]
        del trimmed.chunk.log_probs[:skip]
        del trimmed.chunk.top_log_probs[:skip]
        trimmed.chunk.first_token_index = chunk.first_token_index + skip
        trimmed.chunk.text = new_text
        # Grow what was given out by this attempt's lead (one list of its own: the attempt's list grows in place).
        self.text = max(self.text, self._text, key=len)
        self.ids.extend(self._ids[len(self.ids):])
        return trimmed


def _stream(responses, as_json: bool) -> None:
    """Print a chunk/done stream: text as it arrives, or one JSON object per message."""
    for response in responses:
        if as_json:
            _print_json(response)
        elif response.WhichOneof("event") == "chunk":
            sys.stdout.write(response.chunk.text)
            sys.stdout.flush()
    if not as_json:
        sys.stdout.write("\n")


def report(error: ClientError, as_json: bool) -> int:
    print(f"{error.code}: {error.message}", file=sys.stderr)
    for detail in error.details:
        print(f"  {detail}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": {"code": error.code, "message": error.message, "details": error.details}}))
    return EXIT_FAILED_CALL


def _from_rpc_error(error: grpc.RpcError) -> ClientError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    details = []
    try:
        status = rpc_status.from_call(error)
    except Exception:  # a trailer that does not match the status is the server's bug, not a reason to crash
        status = None
    if status is not None:
        from google.rpc import error_details_pb2

        for packed in status.details:
            if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                packed.Unpack(bad_request)
                details += [f"field {v.field}: {v.description}" for v in bad_request.field_violations]
    return ClientError(code.name if code is not None else "UNKNOWN", message or "", details)


def _check_utf8(field: str, text: str) -> None:
    # Arguments that are not UTF-8 reach Python as lone surrogates, which protobuf cannot even encode;
    # the server would refuse them the same way.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")  # the bytes as they were given
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "surrogatepass")
        raise ClientError("INVALID_ARGUMENT", f"{field} must be valid UTF-8, got the bytes {raw[:32]!r}") from None


def _print_json(message) -> None:
    print(json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True), ensure_ascii=False))


if __name__ == "__main__":
    raise SystemExit(main())
