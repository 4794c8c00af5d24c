"""Decoding on the serving side, in numpy: parameters, per-row columns, processors, token choice, beams.

Same semantics as the PyTorch reference decoders (`training/models/decoding.py`), token for token.
"""

from server.decoding.beam import BeamSearch, BeamStep
from server.decoding.chooser import Choice, TokenChooser, TopAlternatives
from server.decoding.constraint import Constraint
from server.decoding.history import TokenHistory
from server.decoding.hypothesis import FinishReason, Hypothesis, gnmt_length_penalty
from server.decoding.params import DecodingParams
from server.decoding.processors import (
    MinNewTokens,
    NoRepeatNGram,
    ProcessorChain,
    RepetitionPenalty,
    default_processors,
)
from server.decoding.row_params import BEAM, GREEDY, SAMPLE, RowParams
from server.decoding.sampling import counter_uniforms, sample_tokens

__all__ = [
    "BEAM", "GREEDY", "SAMPLE", "BeamSearch", "BeamStep", "Choice", "Constraint", "DecodingParams", "FinishReason",
    "Hypothesis", "MinNewTokens", "NoRepeatNGram", "ProcessorChain", "RepetitionPenalty", "RowParams",
    "TokenChooser", "TokenHistory", "TopAlternatives", "counter_uniforms", "default_processors",
    "gnmt_length_penalty", "sample_tokens",
]
