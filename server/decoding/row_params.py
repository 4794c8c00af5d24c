"""Per-row decoding parameters as columns (struct of arrays), carried by a batch beside its state.

Rows with different strategies and settings share one decode step: processors and the token chooser
read these columns with masks instead of looping over rows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from server.decoding.params import DecodingParams

GREEDY, SAMPLE, BEAM = 0, 1, 2
STRATEGY_CODES = {"greedy": GREEDY, "sample": SAMPLE, "beam": BEAM}


@dataclass(frozen=True)
class RowParams:
    """One entry per batch row; a beam request contributes beam_size identical rows."""

    strategy: np.ndarray  # int8: GREEDY | SAMPLE | BEAM
    max_new_tokens: np.ndarray  # int64
    min_new_tokens: np.ndarray  # int64
    temperature: np.ndarray  # float64
    top_k: np.ndarray  # int64, 0 = off
    top_p: np.ndarray  # float64, 1.0 = off
    seed: np.ndarray  # uint64 (0 for rows that do not sample)
    repetition_penalty: np.ndarray  # float64, 1.0 = off
    no_repeat_ngram_size: np.ndarray  # int64, 0 = off
    top_logprobs: np.ndarray  # int64, 0 = no alternatives

    @classmethod
    def from_params(cls, params: DecodingParams, n_rows: int = 1) -> RowParams:
        """Columns for `n_rows` rows of one (validated) request; a missing sampling seed is drawn (`with_seed`)."""
        seed = (params.with_seed().seed if params.strategy == "sample" else params.seed) or 0
        values = {
            "strategy": STRATEGY_CODES[params.strategy],
            "max_new_tokens": params.max_new_tokens,
            "min_new_tokens": params.min_new_tokens,
            "temperature": params.temperature,
            "top_k": params.top_k,
            "top_p": params.top_p,
            "seed": seed,
            "repetition_penalty": params.repetition_penalty,
            "no_repeat_ngram_size": params.no_repeat_ngram_size,
            "top_logprobs": params.top_logprobs,
        }
        return cls(**{name: np.full(n_rows, values[name], dtype=dtype) for name, dtype in _COLUMNS})

    @classmethod
    def empty(cls) -> RowParams:
        return cls(**{name: np.empty(0, dtype=dtype) for name, dtype in _COLUMNS})

    def __len__(self) -> int:
        return len(self.strategy)

    def filter(self, index: np.ndarray) -> RowParams:
        """Rows `index` (a boolean mask or integer indices, repeats allowed), in that order."""
        return RowParams(**{name: getattr(self, name)[index] for name, _ in _COLUMNS})

    @staticmethod
    def concatenate(parts: list[RowParams]) -> RowParams:
        if not parts:
            return RowParams.empty()
        return RowParams(**{name: np.concatenate([getattr(p, name) for p in parts]) for name, _ in _COLUMNS})


# Column names and dtypes, listed once so filter/concatenate never reflect on the dataclass per step.
_COLUMNS = tuple(
    (f.name, dtype) for f, dtype in zip(fields(RowParams), (
        np.int8, np.int64, np.int64, np.float64, np.int64, np.float64, np.uint64, np.float64, np.int64,
        np.int64,
    ), strict=True)
)
