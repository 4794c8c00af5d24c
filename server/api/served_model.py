"""One engine's model as both APIs see it: its identity, its tokenizers (texts in, with the input caps of
`server.text.input`), and its answers as seqserve.v1 messages."""

from __future__ import annotations

from seqserve.v1 import service_pb2 as pb
from server.api import convert
from server.engine.requests import FinishEvent, TokenEvent
from server.text.input import check_input_chars, encode_text


class ServedModel:
    """One engine's model as the API sees it: identity, tokenizers, and its answers as messages."""

    def __init__(self, engine):
        self.engine = engine
        self.bundle = engine.bundle
        spec = self.bundle.spec
        self.name, self.version, self.kind = spec.name, spec.version, spec.kind.to_pb()  # the wire's enum
        self._bos = spec.special.bos
        self._output = self.bundle.tokenizer(spec.output_tokenizer_role)

    def check_source_chars(self, text: str, field: str) -> None:
        check_input_chars(self.bundle.tokenizer("source"), text, field, self.engine.max_input_tokens)

    async def encode_source(self, text: str, field: str) -> list[int]:
        return await encode_text(self.bundle.tokenizer("source"), text, field, self.engine.max_input_tokens)

    async def encode_prompt(self, text: str) -> list[int]:
        """<bos> then the prompt's tokens (an empty prompt generates from the start of a sequence)."""
        return [self._bos, *await encode_text(self.bundle.tokenizer("text"), text, "prompt",
                                              self.engine.max_input_tokens)]

    def chunk(self, events: list[TokenEvent], first_index: int, into: pb.TokenChunk | None = None) -> pb.TokenChunk:
        """One TokenChunk of `events` (filling `into`, e.g. a response's chunk field, when given)."""
        if len(events) == 1:
            event = events[0]
            return convert.chunk_to_pb(event.token_ids, event.text, first_index, self._output,
                                       log_probs=event.log_probs, alternatives=event.top_alternatives, into=into)
        ids = [token for event in events for token in event.token_ids]
        log_probs = [p for event in events for p in (event.log_probs or ())]
        alternatives = [a for event in events for a in (event.top_alternatives or ())]
        return convert.chunk_to_pb(ids, "".join(event.text for event in events), first_index, self._output,
                                   log_probs=log_probs, alternatives=alternatives, into=into)

    def translation(self, finish: FinishEvent, tokens: TokenLog, source_ids: list[int],
                    return_attention: bool) -> pb.Translation:
        translation = pb.Translation()
        texts = finish.texts or [finish.text]
        for index, hypothesis in enumerate(finish.hypotheses):
            length = len(hypothesis.tokens)
            # The streamed tokens are the best hypothesis' (greedy, sampling); beams stream none of theirs.
            streamed = index == 0 and tokens.ids[:length] == list(hypothesis.tokens)
            attention = None
            if return_attention and finish.attention is not None and index < len(finish.attention):
                attention = finish.attention[index][:length]  # one row per token of token_ids
            translation.hypotheses.append(convert.hypothesis_to_pb(
                hypothesis, self._output, text=texts[index] if index < len(texts) else None,
                token_log_probs=tokens.log_probs[:length] if streamed and tokens.log_probs else None,
                alternatives=tokens.alternatives[:length] if streamed and tokens.alternatives else None,
                attention=attention))
        if return_attention:
            source = self.bundle.tokenizer("source")
            translation.source_token_ids.extend(source_ids)
            translation.source_tokens.extend(source.id_to_token(token) or "" for token in source_ids)
        return translation

    def generation_done(self, finish: FinishEvent, stop: tuple[str, ...], prompt_tokens: int, *,
                        session_tokens_consumed: int = 0) -> pb.GenerationDone:
        """The last message of a generation (Generate's, or GenerateInSession's with the session's count)."""
        best = finish.hypotheses[0] if finish.hypotheses else None
        return pb.GenerationDone(
            finish_reason=convert.finish_reason_to_pb(finish.reason), prompt_tokens=prompt_tokens,
            generated_tokens=len(finish.generated_ids), text=finish.text, matched_stop=self.matched_stop(finish, stop),
            log_prob=best.log_prob if best is not None else 0.0, model=self.name, version=self.version,
            session_tokens_consumed=session_tokens_consumed, seed=finish.seed)

    def matched_stop(self, finish: FinishEvent, stop: tuple[str, ...]) -> str:
        """The stop string that ended a generation: the one found earliest in the generated text."""
        if convert.finish_reason_to_pb(finish.reason) != pb.FINISH_REASON_STOP_SEQUENCE or not stop:
            return ""
        text = self._output.decode(finish.generated_ids)
        found = [(text.find(s), i) for i, s in enumerate(stop) if s in text]
        return stop[min(found)[1]] if found else ""


class TokenLog:
    """The per-token extras a stream carried (its FinishEvent's hypotheses do not repeat them)."""

    def __init__(self):
        self.ids: list[int] = []
        self.log_probs: list[float] = []
        self.alternatives: list = []

    def add(self, event: TokenEvent) -> None:
        self.ids += event.token_ids
        if event.log_probs is not None:
            self.log_probs += event.log_probs
        if event.top_alternatives is not None:
            self.alternatives += event.top_alternatives
