"""Evaluation figures: g2p word/phoneme error rates, BLEU and chrF, perplexity and bits per unit.

Pure Python (sacrebleu for BLEU and chrF), no torch, so the exporters and tests can use it anywhere.
Several references per hypothesis are allowed throughout: cmudict words have several pronunciations
and Ding sources several translations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

References = Sequence[Sequence[str]]  # for each hypothesis, one or more reference strings


def _check_lengths(hyps: Sequence[str], refs: References) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"got {len(hyps)} hypotheses but {len(refs)} reference lists")
    if not hyps:
        raise ValueError("no hypotheses to score")
    for index, references in enumerate(refs):
        if isinstance(references, str) or not references:
            raise ValueError(
                f"refs[{index}] must be a non-empty list of reference strings, got {references!r}"
            )


def edit_distance(hyp: Sequence[str], ref: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences (substitution, insertion, deletion cost 1)."""
    previous = list(range(len(ref) + 1))  # distances from the empty hyp prefix
    for i, hyp_token in enumerate(hyp, start=1):
        current = [i]
        for j, ref_token in enumerate(ref, start=1):
            current.append(
                min(
                    previous[j] + 1,  # hyp token deleted
                    current[j - 1] + 1,  # ref token inserted
                    previous[j - 1] + (hyp_token != ref_token),  # match or substitution
                )
            )
        previous = current
    return previous[-1]


def word_error_rate(hyps: Sequence[str], refs: References) -> float:
    """Fraction of hypotheses that equal none of their references (0..1).

    The g2p convention (Sequitur, g2p-seq2seq): a word is right when its predicted pronunciation
    matches any reference exactly. Whitespace is normalised before comparing ("AH0  B" == "AH0 B").
    """
    _check_lengths(hyps, refs)
    wrong = 0
    for hyp, references in zip(hyps, refs, strict=True):
        hyp_tokens = hyp.split()
        if all(hyp_tokens != reference.split() for reference in references):
            wrong += 1
    return wrong / len(hyps)


def closest_reference(hyp: str, references: Sequence[str]) -> tuple[int, str]:
    """(edit distance, reference) of the reference closest to hyp; the first listed wins ties."""
    hyp_tokens = hyp.split()
    return min(
        ((edit_distance(hyp_tokens, reference.split()), reference) for reference in references),
        key=lambda scored: scored[0],
    )


def phoneme_error_rate(hyps: Sequence[str], refs: References) -> float:
    """Summed token edit distance to each hypothesis' closest reference, over those references' summed length.

    Tokens are whitespace-separated (phonemes). Can exceed 1 when hypotheses are much longer than
    their references.
    """
    _check_lengths(hyps, refs)
    edits = 0
    length = 0
    for hyp, references in zip(hyps, refs, strict=True):
        distance, reference = closest_reference(hyp, references)
        edits += distance
        length += len(reference.split())
    if length == 0:
        raise ValueError("the closest references are all empty: the phoneme error rate is undefined")
    return edits / length


def strip_stress(pron: str) -> str:
    """Remove ARPAbet stress digits: "AH0 B AW1 T" -> "AH B AW T" (whitespace normalised)."""
    return " ".join(phoneme.rstrip("012") for phoneme in pron.split())


def _reference_streams(refs: References) -> list[list[str]]:
    """sacrebleu's layout: stream k holds every hypothesis' k-th reference.

    Hypotheses with fewer references are padded with their first one; a repeated reference changes
    neither BLEU (n-gram counts are clipped by the maximum over references, and the closest length
    is unchanged) nor chrF (the best-scoring reference is kept).
    """
    most = max(len(references) for references in refs)
    padded = [list(references) + [references[0]] * (most - len(references)) for references in refs]
    return [list(stream) for stream in zip(*padded, strict=True)]


def bleu(hyps: Sequence[str], refs: References) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, 4-grams), on sacrebleu's 0..100 scale."""
    import sacrebleu  # here, not at the top: only the text metrics need it, and it is slow to import

    _check_lengths(hyps, refs)
    return float(sacrebleu.corpus_bleu(list(hyps), _reference_streams(refs)).score)


def chrf(hyps: Sequence[str], refs: References) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), on sacrebleu's 0..100 scale."""
    import sacrebleu

    _check_lengths(hyps, refs)
    return float(sacrebleu.corpus_chrf(list(hyps), _reference_streams(refs)).score)


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token), from a summed NLL in nats."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    return math.exp(total_nll / n_tokens)


def bits_per_unit(total_nll_nats: float, n_units: int) -> float:
    """Summed NLL in nats converted to bits per unit (bits per character when units are characters).

    Dividing by characters or words instead of tokens makes models with different tokenizers
    comparable.
    """
    if n_units <= 0:
        raise ValueError(f"n_units must be positive, got {n_units}")
    return total_nll_nats / (n_units * math.log(2))
