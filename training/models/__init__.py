"""PyTorch models with explicit recurrent state, and the reference decoders that check every later stage."""

from training.models.lm import LanguageModel, LMArgs
from training.models.seq2seq import Seq2Seq, Seq2SeqArgs

__all__ = ["LanguageModel", "LMArgs", "Seq2Seq", "Seq2SeqArgs", "build_model"]


def build_model(kind: str, args: dict):
    """Rebuild a model from the `model_args` a checkpoint carries."""
    if kind == "lm":
        return LanguageModel(LMArgs(**args))
    if kind == "seq2seq":
        return Seq2Seq(Seq2SeqArgs(**args))
    raise ValueError(f"model kind must be 'lm' or 'seq2seq', got {kind!r}")
