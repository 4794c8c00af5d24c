"""The serving engine: one ModelEngine per loaded model version, continuous batching over ONNX Runtime.

requests validated on entry (validation.py) -> queue and admission (scheduler.py) -> batched prefill or
encode, then one decode call per step for every row (runner.py, batch.py, core.py) -> token choice
(server.decoding; beam groups in beams.py) -> text and stop strings (text.py, tracking.py) -> events on
each request's stream (requests.py). engine.py runs that loop on a worker thread beside asyncio.
"""

from server.engine.config import EngineConfig
from server.engine.engine import ModelEngine
from server.engine.requests import (
    Event,
    FeedRequest,
    FinishEvent,
    GenerationRequest,
    RequestStream,
    TokenEvent,
    TranslationRequest,
)

__all__ = [
    "EngineConfig", "Event", "FeedRequest", "FinishEvent", "GenerationRequest", "ModelEngine",
    "RequestStream", "TokenEvent", "TranslationRequest",
]
