"""Events and a request stream for the tests of RequestStream and of the API's stream helpers."""

from __future__ import annotations

from server.decoding import DecodingParams, FinishReason
from server.engine.requests import FinishEvent, RequestStream, TokenEvent


def token(i: int) -> TokenEvent:
    return TokenEvent(token_ids=[i], log_probs=None, top_alternatives=None, text=f"t{i}")


def finish() -> FinishEvent:
    return FinishEvent(reason=FinishReason.LENGTH, hypotheses=[], text="", generated_ids=[], final_state=None,
                       prompt_tokens=1)


def stream() -> tuple[RequestStream, list[str]]:
    cancelled = []
    return RequestStream("r", DecodingParams(), on_cancel=lambda: cancelled.append("cancelled")), cancelled
