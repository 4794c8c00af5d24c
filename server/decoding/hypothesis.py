"""What a finished decode is: its tokens, scores and the reason it stopped; the GNMT length penalty."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class FinishReason(str, Enum):
    """Why a sequence stopped; the value is what reaches the client."""

    EOS = "eos"  # the model chose <eos>
    LENGTH = "length"  # max_new_tokens were generated
    STOP_SEQUENCE = "stop"  # the text reached one of the request's stop strings (the engine decides)
    CANCELLED = "cancelled"  # the client went away or the deadline passed


@dataclass(frozen=True)
class Hypothesis:
    """One decoded sequence.

    tokens: generated ids, without the prompt and without <eos>.
    log_prob: sum of the chosen tokens' processed log-probs, <eos> included when it was chosen.
    score: log_prob / gnmt_length_penalty(len(tokens), alpha) for beam search; log_prob otherwise.
    """

    tokens: list[int]
    score: float
    log_prob: float
    finish_reason: FinishReason


def gnmt_length_penalty(length: int, alpha: float) -> float:
    """((5 + |Y|) / 6) ** alpha, with |Y| the generated length excluding the prompt and <eos>.

    Plain Python floats on purpose: the PyTorch reference computes the same expression, so beam scores
    and stopping decisions agree bit for bit.
    """
    return ((5.0 + length) / 6.0) ** alpha

