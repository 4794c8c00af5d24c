"""Constraints compiled for one vocabulary, and the matchers of the batch rows that carry one.

The matching is llguidance's (Rust, no torch): it takes regexes, Lark grammars and JSON schemas alike,
computes the masks of many rows in one call on its own threads (the GIL released), and its matchers copy
cheaply (a beam forks its parent's). Why it and not xgrammar or outlines-core: xgrammar's Python package
needs torch, which the server never imports, and takes EBNF rather than Lark; outlines-core has no
context-free grammars. The numbers measured here are in docs/constraints.md.

The matcher sees each token as the bytes it adds to the output text: a char or byte-level BPE token's own
bytes; a word token's with the separator first (" AH"), so that separators count. Where the text starts
without one (nothing spoken before it), the constraint is compiled behind a leading separator (`lead`).
Every single byte is also a token of the matcher's vocabulary, above the model's ids and never allowed: its
prefix handling needs every byte string to be spellable, which char and word vocabularies are not.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import llguidance
import numpy as np
from llguidance.numpy import fill_next_token_bitmask_par

from server.decoding.constraint import DEFAULT_MAX_CHARS, Constraint
from server.errors import InvalidArgument

MAX_REASON_CHARS = 200  # a compiler's reason is cut to this in an error message
_PROBE_MASKS = 256  # mask computations spent, at most, proving that the vocabulary can produce a constraint
_PROBE_BRANCHES = 3  # tokens tried at each depth of that proof
_PROBE_SECONDS = 0.05  # and the time spent on it
_USER_START = "seqserve_user_start"


@dataclass(frozen=True)
class ConstraintSettings:
    """Bounds on what compiling a constraint may cost (`constraint_*` in the server's settings)."""

    max_chars: int = DEFAULT_MAX_CHARS  # characters of a constraint's text (all choices together)
    compile_seconds: float = 2.0  # longer to compile at the API edge: INVALID_ARGUMENT
    cache_entries: int = 256  # compiled constraints kept per vocabulary (least recently used out first)
    max_grammar_size: int = 500_000  # symbols of the compiled grammar (llguidance's max_grammar_size)
    lexer_fuel: int = 1_000_000  # regex analysis when compiling, ~50 per microsecond (initial_lexer_fuel)
    step_fuel: int = 200_000  # lexer work of one row's mask, ~14 per microsecond (step_lexer_fuel)
    # a mask (after the first) slower than this when the constraint is checked: refused, as every row that
    # carries it would add that to every step
    mask_ms: float = 5.0
    mask_threads: int = 0  # llguidance's threads for the masks of a step; 0 = one fewer than the cores (at least 1)

    def __post_init__(self):
        if isinstance(self.mask_threads, bool) or not isinstance(self.mask_threads, int) or self.mask_threads < 0:
            raise ValueError(f"constraint setting mask_threads must be an integer >= 0, got {self.mask_threads!r}")
        for name in ("max_chars", "cache_entries", "max_grammar_size", "lexer_fuel", "step_fuel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"constraint setting {name} must be a positive integer, got {value!r}")
        for name in ("compile_seconds", "mask_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"constraint setting {name} must be a number > 0, got {value!r}")

    def limits(self) -> llguidance.LLParserLimits:
        return llguidance.LLParserLimits(max_grammar_size=self.max_grammar_size, initial_lexer_fuel=self.lexer_fuel,
                                         step_lexer_fuel=self.step_fuel, verbose_errors=False)


class AllowedTokens(NamedTuple):
    """The tokens each constrained row may choose next."""

    rows: np.ndarray  # [C] int64: the constrained rows, indices into the part's rows
    mask: np.ndarray  # [C, V] bool: allowed tokens (a dead end allows only <eos>)
    bias: np.ndarray  # [C, V] float32: 0 where allowed, -inf elsewhere (added to log-probs: one pass)
    only_end: np.ndarray  # [C] bool: <eos> is the one token allowed (the text is complete, or a dead end)


class ConstraintCompiler:
    """One vocabulary's llguidance tokenizer and its compiled constraints (an LRU of matchers in their first
    state, copied for every row; failures are remembered too, so a bad constraint sent again costs nothing).
    Thread-safe: the API edge compiles on worker threads while the engine copies."""

    def __init__(self, pieces: Sequence[bytes], silent: np.ndarray, eos_id: int, separator: str = "",
                 settings: ConstraintSettings | None = None):
        self.vocab_size = len(pieces)
        self.eos_id = eos_id
        self.separator = separator
        self.silent = np.asarray(silent, dtype=bool)  # [V]: ids that add no text (special, unknown)
        self.settings = settings or ConstraintSettings()
        self._limits = self.settings.limits()
        self._tokenizer = _llg_tokenizer(pieces, silent, eos_id, separator)
        self._cache: OrderedDict[tuple[Constraint, str], llguidance.LLMatcher | InvalidArgument] = OrderedDict()
        self._lock = threading.Lock()

    def lead(self, spoken: bool) -> str:
        """What the matcher reads before a row's text: the separator where the text starts without one."""
        return self.separator if self.separator and not spoken else ""

    def compile(self, constraint: Constraint, lead: str = "") -> llguidance.LLMatcher:
        """The constraint's matcher in its first state (shared: copy it with `matcher`), from the cache or
        compiled now; InvalidArgument naming the field if it does not compile, is too large, or the
        vocabulary cannot produce any text it accepts."""
        key = (constraint, lead)
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
        if found is None:
            try:
                found = self._compile(constraint, lead)
            except InvalidArgument as error:
                found = error
            with self._lock:
                found = self._cache.setdefault(key, found)  # an answer given meanwhile (a timeout) stands
                while len(self._cache) > self.settings.cache_entries:
                    self._cache.popitem(last=False)
        if isinstance(found, InvalidArgument):
            raise found
        return found

    def matcher(self, constraint: Constraint, lead: str = "") -> llguidance.LLMatcher:
        """A matcher of its own for one row."""
        return self.compile(constraint, lead).deep_copy()

    def remember(self, constraint: Constraint, lead: str, error: InvalidArgument) -> None:
        """Answer `error` for this constraint from now on (it took too long to compile)."""
        with self._lock:
            self._cache[(constraint, lead)] = error

    def cached(self, constraint: Constraint, lead: str = "") -> bool:
        with self._lock:
            return (constraint, lead) in self._cache

    def _compile(self, constraint: Constraint, lead: str) -> llguidance.LLMatcher:
        constraint.validate(self.settings.max_chars)
        field = constraint.field
        try:
            grammar = _grammar(constraint, lead)
        except ValueError as error:
            raise _refused(field, "does not compile", str(error)) from None
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer,
                                                                               limits=self._limits)
        if failed:
            raise _refused(field, "does not compile", messages[0] if messages else "")
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=self._limits)
        if matcher.is_error():
            raise _refused(field, "does not compile", matcher.get_error())
        producible, typical = _probe(matcher, self.vocab_size, self.eos_id)
        if not producible:
            raise InvalidArgument(f"{field} accepts no text that this model's vocabulary can spell"
                                  + (f" (its tokens are words joined by {self.separator!r})" if self.separator
                                     else ""), field=field)
        if typical * 1e3 > self.settings.mask_ms:
            raise InvalidArgument(f"{field} is too costly to follow: its next tokens took "
                                  f"{typical * 1e3:.1f} ms to work out, more than the server's constraint_mask_ms "
                                  f"({self.settings.mask_ms:g} ms) per row and step", field=field)
        return matcher


class ConstraintRows:
    """The matcher of every row of a part of the batch, in its order (None: the row has no constraint).

    Continuous batching's two operations: `filter` (rows leave; a beam's rows follow their parents, and a
    parent continued by several rows is copied for all but the first) and `concatenate`. A part without
    constrained rows costs an empty array per step and nothing else. The tokens rows choose are taken by
    their matchers together with the next masks (`allowed_tokens`), so that both run while the model
    works on the next step.
    """

    __slots__ = ("matchers", "flags", "count", "pending")

    def __init__(self, matchers: np.ndarray, flags: np.ndarray, pending: list | None = None):
        self.matchers = matchers  # [N] object: LLMatcher or None
        self.flags = flags  # [N] bool: the row has a matcher
        self.count = int(np.count_nonzero(flags))
        self.pending = pending if pending is not None else []  # (matcher, token) chosen, not yet consumed

    @classmethod
    def empty(cls, rows: int = 0) -> ConstraintRows:
        return cls(np.full(rows, None, dtype=object), np.zeros(rows, dtype=bool))

    @classmethod
    def of(cls, matchers: Sequence[llguidance.LLMatcher | None]) -> ConstraintRows:
        array = np.empty(len(matchers), dtype=object)
        array[:] = list(matchers)
        return cls(array, np.array([m is not None for m in matchers], dtype=bool))

    def __len__(self) -> int:
        return len(self.matchers)

    @property
    def active(self) -> bool:
        return self.count > 0

    def filter(self, index: np.ndarray) -> ConstraintRows:
        """Rows `index` (a boolean mask or integer indices, repeats allowed), in that order."""
        flags = self.flags[index]
        if not self.count:
            return ConstraintRows(np.full(len(flags), None, dtype=object), flags)
        picked = self.matchers[index]
        if index.dtype != bool and len(np.unique(index)) < len(index):  # a beam parent with several children
            self.settle()  # a copy starts from every token its parent chose
            seen = set()
            for i in np.flatnonzero(flags).tolist():
                matcher = picked[i]
                if id(matcher) in seen:
                    picked[i] = matcher.deep_copy()
                seen.add(id(matcher))
        return ConstraintRows(picked, flags, self.pending)

    @staticmethod
    def concatenate(parts: Sequence[ConstraintRows]) -> ConstraintRows:
        flags = np.concatenate([p.flags for p in parts]) if parts else np.zeros(0, dtype=bool)
        if not any(p.count for p in parts):
            return ConstraintRows(np.full(len(flags), None, dtype=object), flags)
        return ConstraintRows(np.concatenate([p.matchers for p in parts]), flags,
                              [pair for p in parts for pair in p.pending])

    def consume(self, tokens: np.ndarray, live: np.ndarray | None = None) -> None:
        """Every constrained row (of those `live`, when given) chose `tokens[row]`; its matcher takes it
        before its next mask (or `settle`)."""
        if not self.count:
            return
        rows = np.flatnonzero(self.flags if live is None else self.flags & live)
        if rows.size:
            self.pending.extend(zip(self.matchers[rows].tolist(), tokens[rows].tolist(), strict=True))

    def settle(self) -> None:
        """The matchers take the tokens chosen since the last mask."""
        if self.pending:
            _executor().consume_token_par(self.pending)
            self.pending.clear()


def allowed_tokens(parts: Sequence[ConstraintRows], vocab_size: int, eos_id: int, threads: int = 0
                   ) -> list[AllowedTokens | None]:
    """The allowed tokens of every constrained row of `parts`, computed together in one call of llguidance's
    thread pool (`threads` of them, 0: one fewer than the cores); None for a part without constrained rows."""
    executor = _executor(threads)
    pending = [pair for part in parts for pair in part.pending]
    if pending:  # every matcher takes its row's last token first (one parallel call)
        executor.consume_token_par(pending)
        for part in parts:
            part.pending.clear()
    rows = [np.flatnonzero(p.flags) if p.count else None for p in parts]
    pairs = []
    for part, index in zip(parts, rows, strict=True):
        if index is not None:
            matchers = part.matchers[index]
            pairs.extend(zip(matchers.tolist(), range(len(pairs), len(pairs) + len(index)), strict=True))
    if not pairs:
        return [None] * len(parts)
    words = (vocab_size + 256 + 31) // 32  # the matcher's vocabulary: the model's ids, then the 256 bytes
    bitmask = np.zeros((len(pairs), words), dtype=np.int32)
    fill_next_token_bitmask_par(executor, pairs, bitmask)
    masks = np.unpackbits(bitmask.view(np.uint8), axis=1, count=vocab_size, bitorder="little").view(bool)
    counts = np.count_nonzero(masks, axis=1)
    masks[counts == 0, eos_id] = True  # a dead end (the vocabulary cannot go on): the row ends
    only_end = (counts <= 1) & masks[:, eos_id]
    biases = np.where(masks, np.float32(0.0), np.float32(-np.inf))
    result, start = [], 0
    for index in rows:
        if index is None:
            result.append(None)
            continue
        end = start + len(index)
        result.append(AllowedTokens(index, masks[start:end], biases[start:end], only_end[start:end]))
        start = end
    return result


def apply_allowed(scores: np.ndarray, allowed: AllowedTokens | None, log_probs: np.ndarray) -> np.ndarray:
    """Disallowed tokens get -inf in the processed `scores` [N, V]. The constraint wins: a row whose allowed
    tokens the other processors all banned (min_new_tokens where only the end is allowed, an n-gram ban) keeps
    the model's own log-probs (`log_probs`) of its allowed tokens."""
    if allowed is None:
        return scores
    rows, mask, bias, _ = allowed
    every_row = len(rows) == len(scores)
    block = scores if every_row else scores[rows]
    block += bias
    stuck = np.flatnonzero(np.isneginf(block.max(axis=1)))
    if stuck.size:
        block[stuck] = np.where(mask[stuck], log_probs[rows[stuck]], -np.inf)
    if not every_row:
        scores[rows] = block
    return scores


@functools.cache
def _executor(threads: int = 0) -> llguidance.LLExecutor:
    return llguidance.LLExecutor(num_threads=threads or max(1, (os.cpu_count() or 2) - 1))


def _llg_tokenizer(pieces: Sequence[bytes], silent: np.ndarray, eos_id: int, separator: str) -> llguidance.LLTokenizer:
    """llguidance's view of the vocabulary: every model id's text bytes (special and silent ids are special
    tokens, never allowed), then one token per byte value."""
    head = separator.encode("utf-8")
    tokens = [f"<[{i}]>".encode() if silent[i] else head + piece for i, piece in enumerate(pieces)]
    tokens += [bytes([b]) for b in range(256)]
    special = [i for i in range(len(pieces)) if silent[i]]

    class Vocabulary:
        eos_token_id = eos_id
        bos_token_id = None
        special_token_ids = special

        def __init__(self, encode):
            self.tokens = tokens
            self._encode = encode

        def __call__(self, text):
            return self._encode(text)

    # Its encoder spells forced text in the same vocabulary: llguidance's own greedy tokenizer of it.
    bare = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary(lambda text: [])), n_vocab=len(tokens))
    encode = lambda text: bare.greedy_tokenize(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary(encode)), n_vocab=len(tokens))


def _grammar(constraint: Constraint, lead: str) -> str:
    """llguidance's grammar for the output text read behind `lead`; ValueError if it cannot be built."""
    kind, text = constraint.kind, constraint.text
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(f"{re.escape(lead)}(?:{text})" if lead else text)
    if kind == "choice":
        literals = " | ".join(json.dumps(lead + value, ensure_ascii=False) for value in constraint.choices)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {literals}")
    if kind == "json_schema":
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not valid JSON: {error}") from None
        if not isinstance(schema, dict | bool):
            raise ValueError(f"a JSON schema is an object or a boolean, got {type(schema).__name__}")
        if lead:
            body = json.dumps(schema if isinstance(schema, dict) else {} if schema else {"not": {}})
            return llguidance.LLMatcher.grammar_from_lark(f"start: {json.dumps(lead)} %json {body}")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    if lead:
        text = f"start: {json.dumps(lead)} {_USER_START}\n" + _renamed_start(text)
    return llguidance.LLMatcher.grammar_from_lark(text)


def _renamed_start(lark: str) -> str:
    """The grammar with its rule `start` renamed (outside strings, regexes and comments), so that a new start
    can put the lead before it."""
    pieces = re.split(r'("(?:\\.|[^"\\])*"|/(?:\\.|[^/\\\n])+/[imslux]*|//[^\n]*)', lark)
    return "".join(piece if i % 2 else re.sub(r"\bstart\b", _USER_START, piece) for i, piece in enumerate(pieces))


def _probe(matcher: llguidance.LLMatcher, vocab_size: int, eos_id: int) -> tuple[bool, float]:
    """(whether the model's tokens spell some text the constraint accepts, the median mask after the first
    in seconds: the first builds the lexer's states, and a busy machine slows some). A depth-first walk of
    their masks, ending as soon as <eos> is allowed, within a budget of masks and time; a walk that runs
    out of it gives the benefit of the doubt. `matcher` is not changed."""
    probe = matcher.deep_copy()
    words = (vocab_size + 256 + 31) // 32
    masks: list[float] = []
    ends_at = time.perf_counter() + _PROBE_SECONDS

    def allowed() -> np.ndarray:
        bitmask = np.zeros((1, words), dtype=np.int32)
        started = time.perf_counter()
        fill_next_token_bitmask_par(_executor(), [(probe, 0)], bitmask)
        masks.append(time.perf_counter() - started)
        return np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)

    def walk() -> bool | None:  # True: reaches an end; False: dead ends only; None: out of budget
        if len(masks) >= _PROBE_MASKS or (len(masks) >= 2 and time.perf_counter() > ends_at):
            return None
        mask = allowed()
        if mask[eos_id]:
            return True
        for token in np.flatnonzero(mask)[:_PROBE_BRANCHES].tolist():
            if not probe.consume_token(token):
                return None
            found = walk()
            probe.rollback(1)
            if found is None or found:
                return found
        return False

    outcome = walk()
    return outcome is not False, float(np.median(masks[1:])) if len(masks) > 1 else 0.0


def _refused(field: str, what: str, reason: str) -> InvalidArgument:
    reason = " ".join(reason.split())
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 3] + "..."
    return InvalidArgument(f"{field} {what}: {reason}" if reason else f"{field} {what}", field=field)
