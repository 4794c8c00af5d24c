"""The serving engine: one ModelEngine per loaded model version, continuous batching over ONNX Runtime.

queue (scheduler.py) -> batched prefill / encode (runner.py) -> one decode call per step for every row
(batch.py, core.py) -> token choice (server.decoding) -> text and stop strings (text.py) -> events
(requests.py), driven by the asyncio loop of engine.py.
"""

from server.engine.config import EngineConfig
from server.engine.engine import EngineStats, ModelEngine
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
    "EngineConfig", "EngineStats", "Event", "FeedRequest", "FinishEvent", "GenerationRequest", "ModelEngine",
    "RequestStream", "TokenEvent", "TranslationRequest",
]
