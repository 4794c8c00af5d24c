"""One request's decoding parameters, validated once on entry (errors name the field, value and range)."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace

from server.decoding.constraint import DEFAULT_MAX_CHARS, Constraint
from server.errors import InvalidArgument

STRATEGIES = ("greedy", "sample", "beam")
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 64
MAX_TOP_LOGPROBS = 20
MAX_NO_REPEAT_NGRAM_SIZE = 32  # the n-gram check costs O(history * n) per row and step
MAX_ABS_LENGTH_PENALTY = 10.0
MAX_SEED = 2**64 - 1  # seeds feed a 64-bit counter-based generator


@dataclass(frozen=True)
class DecodingParams:
    """How to decode one request. Every field is checked by `validate`, whatever the strategy."""

    strategy: str = "greedy"  # greedy | sample | beam
    max_new_tokens: int = 64  # generated tokens, <eos> excluded, at most the server's limit
    min_new_tokens: int = 0  # <eos> is banned until this many tokens were generated
    temperature: float = 1.0  # sample: divides the log-probs before softmax; 0 = greedy (any strategy)
    top_k: int = 0  # sample: keep the k most probable tokens (ties kept); 0 = off
    top_p: float = 1.0  # sample: keep the smallest most-probable set with mass >= top_p; 1.0 = off
    seed: int | None = None  # sample: fixes the draws; None -> the server draws one (see `with_seed`)
    beam_size: int = 4  # beam: live hypotheses per request
    length_penalty: float = 1.0  # beam: GNMT alpha in ((5 + |Y|) / 6) ** alpha
    n_best: int = 1  # beam: hypotheses returned, best first
    early_stopping: bool = False  # beam: stop at n_best finished (True) or when none can be beaten (False)
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one that appears
    repetition_penalty: float = 1.0  # log-probs of tokens already in the history are multiplied by this
    no_repeat_ngram_size: int = 0  # ban tokens that would repeat an n-gram of the history; 0 = off
    return_log_probs: bool = False  # return each chosen token's log-prob
    top_logprobs: int = 0  # also return this many most probable alternatives per step
    # what the output text must match (regex, choice, JSON schema, Lark grammar); None = anything. Greedy
    # with a choice list scores every choice whole: it runs as a beam of one row per choice (see `validate`)
    constraint: Constraint | None = None
    # Set by `validate` on what it returns, so a request is validated once, where it enters: the API
    # validates against the server's limits, and the engine validates only what arrives unvalidated.
    validated: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self):
        # Normalise the one field whose natural client-side type is mutable.
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))

    def with_seed(self) -> DecodingParams:
        """A copy with a seed drawn by the server when the client gave none, so it can be reported back."""
        if self.seed is not None:
            return self
        return replace(self, seed=secrets.randbits(64))

    def validate(self, max_new_tokens_limit: int, *, max_beam_size: int = 16,
                 max_constraint_chars: int = DEFAULT_MAX_CHARS) -> DecodingParams:
        """Raise `InvalidArgument` naming the first bad field; return the parameters as they will be used,
        marked `validated` (validated parameters are returned as they are).

        Temperature 0 means greedy, for every caller: a sampling request with it becomes greedy, and a
        greedy or beam one (whose choice no temperature changes) keeps its strategy. A sampling request
        without a seed gets one drawn here (`with_seed`), so the seed used can be reported back.

        Greedy with a choice constraint answers the choice the model scores highest (the sum of its tokens'
        log-probs and the end's), not the token-by-token greedy path: it becomes a beam search with one beam
        per choice (at most max_beam_size), no length penalty and one result, which explores every choice
        of a tokenizer that spells each choice one way (char, word) whole.
        """
        if self.validated:
            return self
        if self.strategy not in STRATEGIES:
            raise InvalidArgument(field="strategy", value=self.strategy,
                                  allowed="one of " + ", ".join(repr(s) for s in STRATEGIES))
        _check_int("max_new_tokens", self.max_new_tokens, 1, max_new_tokens_limit)
        _check_int("min_new_tokens", self.min_new_tokens, 0, self.max_new_tokens,
                   allowed=f"in [0, {self.max_new_tokens}] (at most max_new_tokens)")
        _check_real("temperature", self.temperature, "a finite number >= 0 (0 = greedy)",
                    lambda v: 0 <= v < math.inf)
        _check_int("top_k", self.top_k, 0, None, allowed=">= 0 (0 turns it off)")
        _check_real("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED, allowed="in [0, 2**64 - 1] or unset")
        _check_int("beam_size", self.beam_size, 1, max_beam_size)
        _check_real("length_penalty", self.length_penalty,
                    f"a finite number in [-{MAX_ABS_LENGTH_PENALTY:g}, {MAX_ABS_LENGTH_PENALTY:g}]",
                    lambda v: -MAX_ABS_LENGTH_PENALTY <= v <= MAX_ABS_LENGTH_PENALTY)
        _check_int("n_best", self.n_best, 1, self.beam_size,
                   allowed=f"in [1, {self.beam_size}] (at most beam_size)")
        _check_bool("early_stopping", self.early_stopping)
        self._validate_stop()
        _check_real("repetition_penalty", self.repetition_penalty, "a finite number >= 1 (1 turns it off)",
                    lambda v: 1 <= v < math.inf)
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, MAX_NO_REPEAT_NGRAM_SIZE,
                   allowed=f"in [0, {MAX_NO_REPEAT_NGRAM_SIZE}] (0 turns it off)")
        _check_bool("return_log_probs", self.return_log_probs)
        _check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.constraint is not None:
            if not isinstance(self.constraint, Constraint):
                raise InvalidArgument(field="constraint", value=self.constraint, allowed="a Constraint or unset")
            self.constraint.validate(max_constraint_chars)
        params = self
        if self.temperature == 0:
            params = replace(self, strategy="greedy" if self.strategy == "sample" else self.strategy,
                             temperature=1.0)
        if params.strategy == "greedy" and params.constraint is not None and params.constraint.kind == "choice":
            if params.top_logprobs:
                raise InvalidArgument(field="top_logprobs", value=params.top_logprobs,
                                      allowed="0 with greedy decoding under a choice constraint (choices are "
                                              "scored whole, not token by token)")
            width = min(len(set(params.constraint.choices)), max_beam_size)
            params = replace(params, strategy="beam", beam_size=width, n_best=1, length_penalty=0.0,
                             early_stopping=False)
        if params.strategy == "beam" and params.top_logprobs:
            raise InvalidArgument(field="top_logprobs", value=params.top_logprobs,
                                  allowed="0 with strategy 'beam' (alternatives are per-step, beams are not)")
        if params.strategy == "sample":
            params = params.with_seed()
        return replace(params, validated=True)

    def _validate_stop(self) -> None:
        if not isinstance(self.stop, tuple):
            raise InvalidArgument(field="stop", value=self.stop, allowed="a list of strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"stop must hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}",
                                  field="stop", value=len(self.stop), allowed=f"at most {MAX_STOP_STRINGS}")
        for i, text in enumerate(self.stop):
            field = f"stop[{i}]"
            if not isinstance(text, str) or not text:
                raise InvalidArgument(field=field, value=text, allowed="a non-empty string")
            if len(text) > MAX_STOP_CHARS:
                raise InvalidArgument(
                    f"{field} must be at most {MAX_STOP_CHARS} characters long, got {len(text)} characters",
                    field=field, value=text, allowed=f"at most {MAX_STOP_CHARS} characters")


def _check_int(field: str, value, low: int, high: int | None, *, allowed: str | None = None) -> None:
    if allowed is None:
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field=field, value=value, allowed=f"an integer {allowed}")
    if value < low or (high is not None and value > high):
        raise InvalidArgument(field=field, value=value, allowed=allowed)


def _check_real(field: str, value, allowed: str, accept) -> None:
    # NaN fails every comparison, so `accept` rejects it without a special case.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not accept(value):
        raise InvalidArgument(field=field, value=value, allowed=allowed)


def _check_bool(field: str, value) -> None:
    if not isinstance(value, bool):
        raise InvalidArgument(field=field, value=value, allowed="true or false")
