"""One step of a beam group (every beam request of one beam size) inside the engine's batch.

`BeamSearch` decides; this module maps its answer onto batch rows: which row each surviving row
continues (the state gather), whose encoder memory it keeps (beams of one request share it, so a pure
reorder copies none), and, for requests that asked, the attention history of every hypothesis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.decoding import BeamSearch, Hypothesis
from server.decoding.matching import AllowedTokens
from server.engine.batch import take_rows
from server.engine.tracking import Tracked


@dataclass
class BeamGroupStep:
    index: np.ndarray  # batch row each surviving row continues (state gather)
    memory_index: np.ndarray  # batch row whose memory each surviving row has
    tokens: np.ndarray  # token each surviving row feeds next
    done: dict[int, list[Hypothesis]]  # slot -> n-best, best first


def step_beam_group(beam: BeamSearch, rows: np.ndarray, log_probs: np.ndarray, attention: np.ndarray | None,
                    tracked: dict[int, Tracked], allowed: AllowedTokens | None = None) -> BeamGroupStep:
    """Advance the group whose rows (in `BeamSearch` order) are `rows` of the batch; `allowed`: the tokens
    its constrained rows may choose."""
    size = beam.beam_size
    if len(rows) != beam.num_rows:
        raise RuntimeError(f"beam group {size} has {beam.num_rows} rows, the batch {len(rows)}")
    before = list(beam.request_ids)
    history_before = beam.history  # BeamSearch replaces it each step, so this one stays as it was
    step = beam.step(take_rows(log_probs, rows), allowed)

    memory_index = rows
    if step.done:
        position = {slot: i for i, slot in enumerate(before)}
        surviving = np.array([position[slot] for slot in beam.request_ids], dtype=np.int64)
        memory_index = rows[(surviving[:, None] * size + np.arange(size)).reshape(-1)]

    if attention is not None:
        watched = [(i, slot) for i, slot in enumerate(before) if tracked[slot].beam_trail is not None]
        if watched:
            _follow_attention(watched, size, rows, attention, history_before, step, beam.request_ids, tracked)
    return BeamGroupStep(rows[step.parent_rows], memory_index, step.next_tokens, step.done)


def _follow_attention(watched, size, rows, attention, history_before, step, surviving_ids, tracked) -> None:
    """Per request that asked for attention: record finished hypotheses' attention, extend live beams'."""
    finished: dict[int, list[Hypothesis]] = {}
    for slot, hypothesis in step.finished:
        finished.setdefault(slot, []).append(hypothesis)
    new_position = {slot: i for i, slot in enumerate(surviving_ids)}
    for old, slot in watched:
        entry = tracked[slot]
        trail = entry.beam_trail  # [K, steps, S]: attention of each live row so far
        steps = trail.shape[1]
        current = attention[rows[old * size : (old + 1) * size], : entry.source_length]
        # Every hypothesis ends on a row of this step: the one whose generated tokens it starts with
        # (live beams never share a token sequence, and dead ones end in <eos>, which no hypothesis has).
        generated = history_before.tokens[old * size : (old + 1) * size]
        offset = int(history_before.lengths[old * size]) - steps  # the prompt's length
        for hypothesis in finished.get(slot, []):
            prefix = hypothesis.tokens[:steps]
            for beam_row in range(size):
                if generated[beam_row, offset : offset + steps].tolist() == prefix:
                    entry.hypothesis_attention[id(hypothesis)] = np.concatenate(
                        [trail[beam_row], current[beam_row][None]])
                    break
        if slot in new_position:
            parents = step.parent_rows[new_position[slot] * size : (new_position[slot] + 1) * size] - old * size
            entry.beam_trail = np.concatenate([trail[parents], current[parents][:, None]], axis=1)
