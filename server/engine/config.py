"""The limits one model's engine works within, one block of defaults with a comment each."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from server.decoding.limits import RequestLimits
from server.decoding.matching import ConstraintSettings

IO_BINDING_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class EngineConfig:
    max_rows: int = 256  # rows advanced per decode step; a beam request holds beam_size rows
    max_queued: int = 1024  # requests waiting for rows (sessions' feeds included); beyond: RESOURCE_EXHAUSTED
    # What a request may ask for (max_new_tokens, beam size, input tokens): the server's one limits object,
    # which the API edge validates against too. Beam requests also need beam_size <= max_rows.
    limits: RequestLimits = field(default_factory=RequestLimits)
    max_prefill_tokens: int = 8192  # padded tokens (rows x longest) per prefill call; one request always fits
    # LM decode step through IO binding, the state kept in ONNX Runtime buffers between steps: "on", "off",
    # or "auto" (on where the session runs on a CUDA device).
    io_binding: str = "auto"
    # what compiling and following a constraint may cost (each process compiles through its own cache)
    constraints: ConstraintSettings = field(default_factory=ConstraintSettings)

    def __post_init__(self):
        if self.io_binding not in IO_BINDING_MODES:
            raise ValueError(f"engine setting io_binding must be one of {', '.join(IO_BINDING_MODES)}, "
                             f"got {self.io_binding!r}")
        for setting in fields(self):
            if setting.name in ("io_binding", "limits", "constraints"):
                continue
            value = getattr(self, setting.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"engine setting {setting.name} must be a positive integer, got {value!r}")
