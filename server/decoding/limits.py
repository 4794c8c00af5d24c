"""The server's request limits and the defaults that turn "0 = the server's default" into numbers: one
object, built from the server's settings, read by the API edge and the engine alike."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from server.decoding.matching import ConstraintSettings


@dataclass(frozen=True)
class RequestLimits:
    max_new_tokens: int = 512  # the most tokens a request may ask to generate
    default_max_new_tokens: int = 64  # what a request that leaves max_new_tokens at 0 gets
    max_beam_size: int = 16  # the widest beam a request may ask for
    default_beam_size: int = 4  # what a beam request that leaves beam_size at 0 gets
    max_sources: int = 64  # source texts in one Translate request
    max_input_tokens: int = 512  # prompt, source or fed tokens of one request (longer: INVALID_ARGUMENT)
    constraints: ConstraintSettings = field(default_factory=ConstraintSettings)  # a constraint's size and compile
    min_priority: int = -10  # the lowest priority a request may ask for (0, the default, lies in the range)
    max_priority: int = 10  # the highest

    def __post_init__(self):
        for limit in fields(self):
            if limit.name in ("constraints", "min_priority", "max_priority"):
                continue
            value = getattr(self, limit.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"request limit {limit.name} must be a positive integer, got {value!r}")
