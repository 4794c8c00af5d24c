"""`seqserve eval`: perplexity and bits per unit for LMs; BLEU, chrF, WER and PER for seq2seq runs."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from training.batching import BOS, EOS, PAD, batchify, lm_stream, lm_targets_mask, make_pair_batch
from training.metrics import bleu, chrf, phoneme_error_rate, strip_stress, word_error_rate


@torch.no_grad()
def lm_nll(model, docs_ids: list[list[int]], device, batch_size: int = 16, bptt: int = 256
           ) -> tuple[float, int]:
    """Total NLL (nats) and number of predicted tokens over the documents as one stream."""
    if not docs_ids:
        return 0.0, 0
    model.eval()
    stream = lm_stream(docs_ids)
    batch_size = max(1, min(batch_size, stream.numel() // 2))
    data = batchify(stream, batch_size)
    state = model.initial_state(batch_size, device)
    total, count = 0.0, 0
    for start in range(0, data.shape[1] - 1, bptt):
        length = min(bptt, data.shape[1] - 1 - start)
        x = data[:, start: start + length].to(device)
        y = data[:, start + 1: start + 1 + length].to(device)
        logits, state = model.logits(x, torch.full((batch_size,), length, dtype=torch.long), state)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                reduction="none")
        mask = lm_targets_mask(y).reshape(-1)
        total += float((nll * mask).sum())
        count += int(mask.sum())
    return total, count


@torch.no_grad()
def seq2seq_nll(model, pairs: list[tuple[list[int], list[int]]], device, batch_size: int = 128
                ) -> tuple[float, int]:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        batch = make_pair_batch(pairs[i: i + batch_size]).to(device)
        logits = model(batch.src, batch.src_lengths, batch.tgt_in)
        total += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch.tgt_out.reshape(-1), ignore_index=PAD, reduction="sum"))
        count += batch.num_target_tokens
    return total, count


def group_references(pairs: list[tuple[str, str]]) -> OrderedDict[str, list[str]]:
    """Every reference of a source, in first-seen order (cmudict words have several pronunciations)."""
    refs: OrderedDict[str, list[str]] = OrderedDict()
    for src, tgt in pairs:
        refs.setdefault(src, []).append(tgt)
    return refs


@torch.no_grad()
def translate(model, tokenizers, sources: list[str], device, beam_size: int = 1, max_new_tokens: int = 100,
              length_penalty: float = 0.0, batch_size: int = 256) -> list[str]:
    """Best hypothesis per source with the reference decoders (the ground truth the server must match)."""
    from training.models.decoding import beam_search, greedy_decode

    model.eval()
    src_tok, tgt_tok = tokenizers["source"], tokenizers["target"]
    out: list[str] = []
    for i in range(0, len(sources), batch_size):
        chunk = sources[i: i + batch_size]
        batch = make_pair_batch([(e.ids, []) for e in src_tok.encode_batch(chunk)]).to(device)
        start, state = model.start(batch.src, batch.src_lengths, BOS)
        if beam_size > 1:
            results = beam_search(model.step_fn(), state, start, eos_id=EOS, max_new_tokens=max_new_tokens,
                                  beam_size=beam_size, length_penalty=length_penalty, n_best=1)
            best = [r[0].tokens for r in results]
        else:
            best = [h.tokens for h in greedy_decode(model.step_fn(), state, start, eos_id=EOS,
                                                    max_new_tokens=max_new_tokens)]
        out.extend(tgt_tok.decode(ids, skip_special_tokens=True) for ids in best)
    return out


def score(hyps: list[str], refs: list[list[str]], task: str) -> dict:
    result = {"bleu": bleu(hyps, refs), "chrf": chrf(hyps, refs)}
    if task == "g2p":
        result["wer"] = word_error_rate(hyps, refs)
        result["per"] = phoneme_error_rate(hyps, refs)
        plain_h = [strip_stress(h) for h in hyps]
        plain_r = [[strip_stress(r) for r in rs] for rs in refs]
        result["wer_no_stress"] = word_error_rate(plain_h, plain_r)
        result["per_no_stress"] = phoneme_error_rate(plain_h, plain_r)
    elif task == "translation":
        result["wer"] = word_error_rate(hyps, refs)
    return result


def decode_and_score(model, tokenizers, pairs: list[tuple[str, str]], task: str, device,
                     beam_size: int = 1, length_penalty: float = 0.0) -> dict:
    refs = group_references(pairs)
    sources = list(refs)
    hyps = translate(model, tokenizers, sources, device, beam_size=beam_size, length_penalty=length_penalty)
    result = score(hyps, list(refs.values()), task)
    result["sources"] = len(sources)
    return result


@torch.no_grad()
def evaluate_model(model, tokenizers, kind: str, task: str, path: str, limit: int = 0, beam_size: int = 1,
                   length_penalty: float = 0.0, device: str | torch.device = "cpu") -> dict:
    """The figures of `seqserve eval` on one split file, for any model with the PyTorch interface
    (the exporters pass ONNX Runtime-backed ones). `limit` keeps the first N documents or sources."""
    from training.data.files import read_documents, read_pairs
    from training.prepare import encode_pairs

    device = torch.device(device)
    model.eval()
    if kind == "lm":
        docs = read_documents(path)
        docs = docs[:limit] if limit else docs
        nll, n = lm_nll(model, [e.ids for e in tokenizers["text"].encode_batch(docs)], device)
        n = max(n, 1)
        chars = sum(len(d) for d in docs) + len(docs)  # every character plus one end-of-document each
        return {"tokens": n, "nll_per_token": nll / n, "perplexity": math.exp(nll / n),
                "bits_per_token": nll / n / math.log(2), "characters": chars,
                "bits_per_character": nll / chars / math.log(2)}
    pairs = read_pairs(path)
    if limit:
        keep = set(list(group_references(pairs))[:limit])
        pairs = [p for p in pairs if p[0] in keep]
    nll, n = seq2seq_nll(model, encode_pairs(pairs, tokenizers["source"], tokenizers["target"]), device)
    n = max(n, 1)
    figures = {"nll_per_token": nll / n, "perplexity": math.exp(min(nll / n, 50.0))}
    figures.update(decode_and_score(model, tokenizers, pairs, task, device, beam_size=beam_size,
                                    length_penalty=length_penalty))
    return figures


def evaluate_checkpoint(payload: dict, split: str = "test", beam_size: int = 1, length_penalty: float = 0.0,
                        limit: int = 0, device: str = "cpu") -> dict:
    """The figures `seqserve eval RUN` prints, measured on the run's own split files."""
    from training.checkpoint import config_from_checkpoint, model_from_checkpoint, tokenizers_from_checkpoint

    cfg = config_from_checkpoint(payload)
    path = getattr(cfg, split)
    if not path:
        raise ValueError(f"the run's config names no {split!r} file")
    dev = torch.device(device)
    model = model_from_checkpoint(payload).to(dev)
    result: dict = {"split": split, "file": path}
    result.update(evaluate_model(model, tokenizers_from_checkpoint(payload), cfg.kind, cfg.task, path, limit,
                                 beam_size, length_penalty, dev))
    if cfg.kind == "seq2seq":
        result["beam_size"] = beam_size
    return result


__all__ = ["lm_nll", "seq2seq_nll", "translate", "score", "decode_and_score", "evaluate_model",
           "evaluate_checkpoint", "EOS"]
