"""The port through which sessions use a model's engine, and nothing else of it.

Sessions see a model as `SessionEngine`: its identity and spec, its text tokenizer and input limit, and
four operations: the zero state a session starts from, feeding tokens into a state, a generation from a
parked state (an ordinary `GenerationRequest`, whose events come on a `RequestStream`), and parking: the
state after what a generation chose. `server.engine.ModelEngine` is the one implementation; the session
modules import only the request and event types of `server.engine.requests` (an import-linter contract
says so), never the engine's scheduler, runner or loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from seqserve.bundle.spec import ModelSpec
from server.decoding import DecodingParams
from server.engine.requests import FinishEvent, GenerationRequest, RequestStream, State


class Tokenizer(Protocol):
    def id_to_token(self, token_id: int) -> str | None: ...


class SessionEngine(Protocol):
    """One model version's engine, as sessions use it."""

    name: str
    version: int
    spec: ModelSpec  # the kind (only LMs hold sessions), special ids, the bundle's identity

    @property
    def accepting(self) -> bool:
        """False once the engine is retiring (a hot swap): an operation then runs on its successor."""

    @property
    def max_input_tokens(self) -> int:
        """The most tokens a prefix or one fed text may have."""

    def tokenizer(self, role: str) -> Tokenizer:
        """The bundle's tokenizer for `role` ("text" for a language model)."""

    def zero_state(self, rows: int = 1) -> State:
        """The state before any token: where a new session starts."""

    async def feed(self, state: State | None, token_ids: list[int], want_log_probs: bool = False, *,
                   next_token_id: int | None = None, deadline: float | None = None
                   ) -> tuple[State, np.ndarray | None]:
        """`state` advanced by `token_ids` (any number), with each token's successor's log-prob if asked."""

    async def check_constraint(self, params: DecodingParams, context_ids: Sequence[int]) -> None:
        """Compile `params.constraint` for this model off the event loop (InvalidArgument naming
        "constraint.<kind>" if it does not compile); nothing to do without one."""

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Start a generation (from a session's parked state: `initial_state`, its last token as the prompt)."""

    async def park(self, state: State, last_token_id: int, finish: FinishEvent) -> tuple[State, list[int]]:
        """The state after a generation that started from (`state`, `last_token_id`) and ended with
        `finish`, before the last token it chose; and every token it chose."""
