"""What the worker remembers about each running request between steps: its text, and the events its
tokens turn into. A greedy or sampling row's tokens and summed log-prob live in the batch's columns
(`ChooserRows`) and are copied here when it ends. Plain rows stream bare token ids (their consumer makes
the text) and get their whole text from the `TokenTable` once, at the end; the others stream their text
through a `TextStream`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from server.decoding import FinishReason, Hypothesis
from server.engine.requests import FinishEvent, GenerationRequest, State, TokenEvent, TranslationRequest
from server.engine.scheduler import Entry
from server.text.stream import TextStream
from server.text.table import TokenTable

# finished_total{reason} labels beyond FinishReason: requests that ended without finishing.
DEADLINE_LABEL = "deadline"


@dataclass(eq=False)
class Tracked:
    entry: Entry
    text: TextStream | None  # greedy and sampling rows that are not plain: the streamed text; else None
    prompt_tokens: int
    source_length: int = 0  # seq2seq: attention rows are cut to it
    table: TokenTable | None = None  # plain rows: their text is decoded by it
    after_text: bool = False  # plain rows: text came before theirs (a word tokenizer's separator first)
    generated: list[int] = field(default_factory=list)  # set when the request ends
    log_prob: float = 0.0  # set when the request ends
    attention: list[np.ndarray] | None = None  # greedy/sampling rows asking for attention
    beam_trail: np.ndarray | None = None  # beam rows asking for attention: [K, steps, source_length]
    hypothesis_attention: dict[int, np.ndarray] = field(default_factory=dict)  # id(Hypothesis) -> rows

    @property
    def params(self):
        return self.entry.params

    @functools.cached_property
    def wants_final_state(self) -> bool:
        """A generation that asked for its final state (translations never have one)."""
        request = self.entry.request
        return isinstance(request, GenerationRequest) and request.return_final_state

    @property
    def wants_attention(self) -> bool:
        request = self.entry.request
        return isinstance(request, TranslationRequest) and request.return_attention

    def on_token(self, token: int, log_prob: float, is_eos: bool, at_limit: bool,
                 alternatives: list[tuple[int, float]] | None) -> tuple[TokenEvent | None, FinishReason | None]:
        """A greedy or sampling row that is not plain chose `token`: the event to send (if any) and why it
        ended (if it did)."""
        reason = None
        if is_eos:
            delta = self.text.finish()
            reason = FinishReason.STOP_SEQUENCE if self.text.stopped else FinishReason.EOS
            token_ids: list[int] = []
        else:
            token_ids = [token]
            delta = self.text.push(token)
            if self.text.stopped:
                reason = FinishReason.STOP_SEQUENCE
            elif at_limit:
                delta += self.text.finish()
                reason = FinishReason.STOP_SEQUENCE if self.text.stopped else FinishReason.LENGTH
        if not token_ids and not delta:
            return None, reason
        params = self.params
        event = TokenEvent(
            token_ids=token_ids,
            log_probs=[log_prob] if params.return_log_probs and token_ids else None,
            top_alternatives=[alternatives] if alternatives is not None and token_ids else None,
            text=delta,
        )
        return event, reason

    def final_text(self, complete: bool = True) -> str:
        """The text of the tokens generated; not `complete` (a cancelled request): only what was sent."""
        if self.text is not None:
            return self.text.text
        return self.table.decode(self.generated, after_text=self.after_text, final=complete)

    def finish_event(self, reason: FinishReason, final_state: State | None = None,
                     last_token_id: int | None = None) -> FinishEvent:
        """The finish event of a greedy or sampling request (also a cancelled request's partial result)."""
        hypothesis = Hypothesis(list(self.generated), self.log_prob, self.log_prob, reason)
        attention = None
        if self.attention is not None:
            rows = np.stack(self.attention) if self.attention else np.zeros((0, self.source_length), np.float32)
            attention = [rows]
        text = self.final_text(complete=reason is not FinishReason.CANCELLED)
        return FinishEvent(reason=reason, hypotheses=[hypothesis], text=text,
                           generated_ids=list(self.generated), final_state=final_state,
                           prompt_tokens=self.prompt_tokens, texts=[text],
                           last_token_id=last_token_id, attention=attention, seed=self._seed())

    def beam_events(self, hypotheses: list[Hypothesis], new_text) -> tuple[TokenEvent, FinishEvent]:
        """A beam request is done: its best hypothesis as one token event, then the finish event.

        Stop strings are applied to each hypothesis as streaming would have: its tokens end with the
        one that completed the stop string, its text before the stop string.
        """
        finals, texts, attention = [], [], []
        for hypothesis in hypotheses:
            stream: TextStream = new_text()
            tokens, reason = hypothesis.tokens, hypothesis.finish_reason
            for index, token in enumerate(tokens):
                stream.push(token)
                if stream.stopped:
                    tokens, reason = tokens[: index + 1], FinishReason.STOP_SEQUENCE
                    break
            else:
                stream.finish()
                reason = FinishReason.STOP_SEQUENCE if stream.stopped else reason
            finals.append(Hypothesis(list(tokens), hypothesis.score, hypothesis.log_prob, reason))
            texts.append(stream.text)
            if self.beam_trail is not None:
                rows = self.hypothesis_attention.get(id(hypothesis))
                attention.append(rows[: len(tokens) + (reason is FinishReason.EOS)] if rows is not None
                                 else np.zeros((0, self.source_length), np.float32))
        best = finals[0]
        token_event = TokenEvent(token_ids=list(best.tokens), log_probs=None, top_alternatives=None,
                                 text=texts[0])
        finish = FinishEvent(reason=best.finish_reason, hypotheses=finals, text=texts[0],
                             generated_ids=list(best.tokens), final_state=None,
                             prompt_tokens=self.prompt_tokens, texts=texts,
                             attention=attention if self.beam_trail is not None else None)
        return token_event, finish

    def _seed(self) -> int | None:
        params = self.params
        return params.seed if params is not None and params.strategy == "sample" else None
