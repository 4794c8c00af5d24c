"""Constraints for a model's output vocabulary: this process's compilers, and the check the API edge awaits.

A compiler (`server.decoding.matching.ConstraintCompiler`) is built once per (tokenizer, model vocabulary
size, settings) in each process, from the tokenizer's `TokenTable` (the bytes each token adds to the text as
the API returns it). The API edge and the engine of one process share it, so the edge's compile warms the
engine's; a process of its own compiles again through its own cache. Compiled constraints never cross
between processes: a request carries its constraint as text (`server.decoding.Constraint`).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from server.decoding import DecodingParams
from server.decoding.matching import ConstraintCompiler, ConstraintSettings
from server.errors import FailedPrecondition, InvalidArgument
from server.text.table import TokenTable

_COMPILE_THREADS = 2  # compiles that may run at once off the event loop (each bounded by the lexer fuel)
_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(size, eos, settings): compiler}
_compilers_lock = threading.Lock()
_compile_pool: ThreadPoolExecutor | None = None


def compiler_for(tokenizer, vocab_size: int, eos_id: int, settings: ConstraintSettings) -> ConstraintCompiler:
    """This process's compiler for a model's output tokenizer; FailedPrecondition where the tokenizer's
    decoder is not one whose text the server can work out token by token (constraints need that)."""
    key = (vocab_size, eos_id, settings)
    with _compilers_lock:
        compilers = _compilers.setdefault(tokenizer, {})
        compiler = compilers.get(key)
    if compiler is None:
        table = TokenTable.build(tokenizer, vocab_size)
        if table is None:
            raise FailedPrecondition("this model's tokenizer decodes in a way the server cannot follow token by "
                                     "token, so it takes no constraint (char, word and byte-level BPE tokenizers do)")
        compiler = ConstraintCompiler(table.pieces, table.silent, eos_id, table.separator, settings)
        with _compilers_lock:
            compiler = _compilers[tokenizer].setdefault(key, compiler)
    return compiler


def compile_constraint(params: DecodingParams, bundle, settings: ConstraintSettings,
                       context_ids: Sequence[int] = ()) -> None:
    """Compile the request's constraint for `bundle`'s output vocabulary now (or find it compiled), on this
    thread; the domain errors of `check_constraint`."""
    spec = bundle.spec
    compiler = compiler_for(bundle.tokenizer(spec.output_tokenizer_role), spec.vocab_size, spec.special.eos, settings)
    compiler.compile(params.constraint, compiler.lead(spoken=_speaks(compiler, context_ids)))


async def check_constraint(params: DecodingParams, tokenizer, vocab_size: int, eos_id: int,
                           settings: ConstraintSettings, context_ids: Sequence[int] = ()) -> None:
    """Compile the request's constraint (or find it compiled) before anything is queued, off the event loop
    and for at most `settings.compile_seconds`; InvalidArgument naming the domain field ("constraint.regex")
    if it does not compile in time, is too large, or the vocabulary cannot spell it. `context_ids`: what
    comes before the output (a word tokenizer's text then starts with its separator)."""
    constraint = params.constraint
    if constraint is None:
        return
    loop = asyncio.get_running_loop()
    pool = _pool()
    compiler = await loop.run_in_executor(pool, compiler_for, tokenizer, vocab_size, eos_id, settings)
    lead = compiler.lead(spoken=_speaks(compiler, context_ids))
    if compiler.cached(constraint, lead):
        compiler.compile(constraint, lead)  # raises what it raised before
        return
    work = loop.run_in_executor(pool, compiler.compile, constraint, lead)
    try:
        await asyncio.wait_for(asyncio.shield(work), settings.compile_seconds)
    except asyncio.TimeoutError:
        error = InvalidArgument(f"{constraint.field} did not compile within {settings.compile_seconds:g} seconds "
                                "(the server's constraint_compile_seconds)", field=constraint.field)
        compiler.remember(constraint, lead, error)  # the same answer next time, whenever this compile ends
        raise error from None


def _speaks(compiler: ConstraintCompiler, context_ids: Sequence[int]) -> bool:
    silent = compiler.silent
    return any(0 <= token < len(silent) and not silent[token] for token in context_ids)


def _pool() -> ThreadPoolExecutor:
    global _compile_pool
    with _compilers_lock:
        if _compile_pool is None:
            _compile_pool = ThreadPoolExecutor(_COMPILE_THREADS, thread_name_prefix="constraint-compile")
        return _compile_pool
