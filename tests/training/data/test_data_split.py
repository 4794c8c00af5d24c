"""Tests for training/data/__init__.py: the grouped, seeded train/valid/test split."""

import pytest

from training.data import SPLIT_NAMES, split_by_group


def _items(n_groups=200):
    # Several items per group, like several pronunciations per word.
    return [(f"w{g:03d}", k) for g in range(n_groups) for k in range(1 + g % 3)]


def test_every_item_lands_in_exactly_one_split():
    items = _items()
    splits = split_by_group(items, lambda item: item[0], seed=1)
    assert set(splits) == set(SPLIT_NAMES)
    assert sorted(sum(splits.values(), [])) == sorted(items)


def test_no_group_is_in_two_splits():
    splits = split_by_group(_items(), lambda item: item[0], seed=1)
    groups = {name: {group for group, _ in items} for name, items in splits.items()}
    assert not groups["train"] & groups["valid"]
    assert not groups["train"] & groups["test"]
    assert not groups["valid"] & groups["test"]


def test_fractions_count_groups():
    splits = split_by_group(_items(200), lambda item: item[0], seed=1, valid_frac=0.05, test_frac=0.1)
    assert len({group for group, _ in splits["valid"]}) == 10
    assert len({group for group, _ in splits["test"]}) == 20


def test_same_seed_same_split_whatever_the_input_order():
    items = _items()
    first = split_by_group(items, lambda item: item[0], seed=7)
    again = split_by_group(list(reversed(items)), lambda item: item[0], seed=7)
    assert {name: sorted(v) for name, v in first.items()} == {name: sorted(v) for name, v in again.items()}


def test_other_seed_other_split():
    items = _items()
    one = split_by_group(items, lambda item: item[0], seed=1)
    two = split_by_group(items, lambda item: item[0], seed=2)
    assert one["test"] != two["test"]


@pytest.mark.parametrize("valid_frac,test_frac", [(-0.1, 0.05), (0.5, 0.5), (0.05, 1.0)])
def test_bad_fractions_are_refused(valid_frac, test_frac):
    with pytest.raises(ValueError, match="valid_frac"):
        split_by_group(_items(), lambda item: item[0], valid_frac=valid_frac, test_frac=test_frac)
