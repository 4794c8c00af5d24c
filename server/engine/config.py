"""The limits one model's engine works within, one block of defaults with a comment each."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from server.decoding.limits import RequestLimits

IO_BINDING_MODES = ("auto", "on", "off")
DEFAULT_PREFIX_CACHE_BYTES = 128 * 1024 * 1024  # per model version: 16k states of a 2 x 512 LSTM (8 KiB each)


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
    # Bytes of prompt-prefix states kept for reuse (`server.engine.prefix_cache`); 0 = no prefix cache.
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES
    prefix_cache_stride: int = 64  # a long prompt's state is also kept every this many tokens
    # The decode call on a thread of its own, beside the admission's prefill and the delivery of the last
    # step's events, which then cost the step nothing; the price is a hand-over between threads every step.
    # Worth it where this process's event loop has the streams to serve (one process for everything), or
    # where a core is free for it; an engine process on a host whose cores are all taken hands over for
    # nothing but a wait for the scheduler (docs/architecture.md, "Processes").
    decode_thread: bool = True
    # A waiting request rises one priority level for every this many seconds it waits (up to max_priority),
    # so low priorities are never starved; 0 = strict priorities, no aging.
    priority_aging_seconds: float = 5.0

    def __post_init__(self):
        if self.io_binding not in IO_BINDING_MODES:
            raise ValueError(f"engine setting io_binding must be one of {', '.join(IO_BINDING_MODES)}, "
                             f"got {self.io_binding!r}")
        for setting in fields(self):
            if setting.name in _NOT_POSITIVE:
                continue
            value = getattr(self, setting.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"engine setting {setting.name} must be a positive integer, got {value!r}")
        for name in ("prefix_cache_bytes",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"engine setting {name} must be an integer, got {value!r}")
        if self.prefix_cache_bytes < 0:
            raise ValueError(f"engine setting prefix_cache_bytes must be >= 0 (0 = off), got {self.prefix_cache_bytes}")
        if not self.limits.min_priority <= 0 <= self.limits.max_priority:
            raise ValueError(f"request limits min_priority <= 0 <= max_priority must hold (0 is the default "
                             f"priority), got {self.limits.min_priority} and {self.limits.max_priority}")
        aging = self.priority_aging_seconds
        if isinstance(aging, bool) or not isinstance(aging, (int, float)) or not aging >= 0:
            raise ValueError(f"engine setting priority_aging_seconds must be >= 0 (0 = no aging), got {aging!r}")


_NOT_POSITIVE = frozenset({"io_binding", "limits", "prefix_cache_bytes", "priority_aging_seconds", "decode_thread"})
