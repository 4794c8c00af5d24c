"""The only code that calls ONNX Runtime (with `binding`, its IO-binding path for the LM's decode step):
batched prefill (LM), batched encode (seq2seq), one decode step.

The runner never decides who runs: it gets rows and returns arrays. The engine calls it from its
worker thread, so the asyncio loop stays responsive while a graph runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from seqserve.bundle.manifest import LAST_LOG_PROBS
from server.bundle import LoadedBundle, LoadedGraph
from server.engine.batch import DecodeBatch
from server.engine.binding import BoundStep, device_of
from server.engine.requests import State

logger = logging.getLogger(__name__)


class Runner:
    """Feeds a bundle's graphs by the names its manifest gives; state tensors in manifest order."""

    def __init__(self, bundle: LoadedBundle, io_binding: str = "auto"):
        """`io_binding` ("auto": where the session runs on a CUDA device, "on", "off"): the LM's decode
        step keeps the state in ONNX Runtime buffers between steps (`server.engine.binding`)."""
        spec = bundle.spec
        self.is_lm = spec.is_lm
        self._prefill: LoadedGraph | None = None
        if self.is_lm:
            self._step = bundle.graph("step")
            state_graph = self._step
            # The prefill graph (no projection but the last position's); bundles exported before it have
            # none, and some have one that returns the state only.
            self._prefill = bundle.graphs.get("prefill")
            self._prefills_last = self._prefill is not None and LAST_LOG_PROBS in self._prefill.output_names
        else:
            self._encoder = bundle.graph("encoder")
            self._decoder = bundle.graph("decoder_step")
            state_graph = self._decoder
        # Names read once, as attributes: the hot path reads no properties.
        self.state_names = spec.state_names
        self.state_shapes = list(spec.state_shapes)
        self.memory_size = spec.memory_size
        self._token_input = state_graph.input_names[0]
        self._lengths_input = state_graph.input_names[1] if self.is_lm else None
        self._outputs = state_graph.output_names
        self._state_outputs = state_graph.state_outputs
        self._session = state_graph.session
        self.bound: BoundStep | None = None
        if self.is_lm and (io_binding == "on" or (io_binding == "auto" and device_of(self._step) == "cuda")):
            self.bound = BoundStep(self._step, self._token_input, self._lengths_input, self.state_names,
                                   self._state_outputs, self.state_shapes)

    def zero_state(self, rows: int) -> State:
        return tuple(np.zeros((rows, *shape), dtype=np.float32) for shape in self.state_shapes)

    def prefill(self, sequences: Sequence[Sequence[int]], state: State, want_log_probs: bool = False,
                want_last: bool = False) -> tuple[State, np.ndarray | None, np.ndarray | None]:
        """LM: feed each row its (non-empty) sequence from `state`, padded, in one call.

        Returns the state after each row's own length; if asked, log_probs [B, T, V] (positions past a
        row's length are padding); if asked, last_log_probs [B, V], the log-probs after each row's last
        token (what the first generated token is chosen from).
        """
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        tokens = np.zeros((len(sequences), int(lengths.max())), dtype=np.int64)
        for row, sequence in enumerate(sequences):  # once per admitted request, not per step
            tokens[row, : len(sequence)] = sequence
        feeds = self._lm_feeds(tokens, lengths, state)
        prefill = self._prefill
        if not want_log_probs and prefill is not None and (self._prefills_last or not want_last):
            # The projection and log-softmax run for the last positions at most, never for every one.
            names = list(prefill.state_outputs) + ([LAST_LOG_PROBS] if want_last else [])
            outputs = prefill.session.run(names, feeds)
            return tuple(outputs[: len(prefill.state_outputs)]), None, outputs[-1] if want_last else None
        if want_log_probs or want_last:
            log_probs, new_state = self._run_step(feeds)
            last = log_probs[np.arange(len(lengths)), lengths - 1] if want_last else None
            return new_state, log_probs if want_log_probs else None, last
        # Only the state is needed: not fetching log_probs [B, T, V] skips copying it out (measured
        # 15-21% of a prefill call in bench/RESULTS.md), though step still computes them.
        return tuple(self._session.run(list(self._state_outputs), feeds)), None, None

    def encode(self, sources: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, State]:
        """seq2seq: (memory [B, S, M], mask [B, S], decoder state) for padded sources, in one call."""
        lengths = np.array([len(s) for s in sources], dtype=np.int64)
        src = np.zeros((len(sources), int(lengths.max())), dtype=np.int64)
        for row, source in enumerate(sources):
            src[row, : len(source)] = source
        names = self._encoder.input_names
        outputs = self._encoder.session.run(None, {names[0]: src, names[1]: lengths})
        by_name = dict(zip(self._encoder.output_names, outputs, strict=True))
        memory, mask = by_name["memory"], by_name["mask"]
        state = tuple(by_name[name] for name in self._encoder.state_outputs)
        return memory, mask, state

    def decode(self, batch: DecodeBatch) -> tuple[np.ndarray, State, np.ndarray | None]:
        """One token per row: (log_probs [B, V], new state, attention [B, S] or None for an LM)."""
        if self.bound is not None:
            try:
                log_probs, state = self.bound.run(batch.tokens, batch.state)
                return log_probs[:, 0], state, None
            except Exception:  # not proven on every provider: serve on with plain calls
                logger.exception("the decode step through IO binding failed; plain calls from now on")
                self.bound = None
        if self.is_lm:
            ones = np.ones(len(batch), dtype=np.int64)
            state = tuple(np.asarray(s) for s in batch.state)  # bound buffers, if binding was given up
            log_probs, state = self._run_step(self._lm_feeds(batch.tokens[:, None], ones, state))
            return log_probs[:, 0], state, None
        feeds = {self._token_input: batch.tokens, "memory": batch.memory, "mask": batch.mask}
        feeds.update(zip(self.state_names, batch.state, strict=True))
        by_name = dict(zip(self._outputs, self._session.run(None, feeds), strict=True))
        state = tuple(by_name[name] for name in self._state_outputs)
        return by_name["log_probs"], state, by_name["attention"]

    def _lm_feeds(self, tokens: np.ndarray, lengths: np.ndarray, state: State) -> dict[str, np.ndarray]:
        feeds = {self._token_input: tokens, self._lengths_input: lengths}
        feeds.update(zip(self.state_names, state, strict=True))
        return feeds

    def _run_step(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, State]:
        """The LM's step graph: (log_probs [B, T, V], new state)."""
        by_name = dict(zip(self._outputs, self._session.run(None, feeds), strict=True))
        return by_name["log_probs"], tuple(by_name[name] for name in self._state_outputs)

