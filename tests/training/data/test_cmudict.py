"""Tests for training/data/cmudict.py: word-grouped g2p pairs with every reference pronunciation."""

from training.data.cmudict import build_cmudict, pronunciation_pairs
from training.data.files import read_pairs

# A stand-in for cmudict.dict(): 60 words, every third with two pronunciations.
FAKE_DICT = {
    f"word{i:02d}": [["W", "ER1", "D"], ["W", "AH0", "D", str(i)]][: 1 + (i % 3 == 0)] for i in range(60)
}


def test_one_pair_per_pronunciation_with_stress_kept():
    pairs = pronunciation_pairs({"read": [["R", "IY1", "D"], ["R", "EH1", "D"]], "a": [["AH0"], ["AH0"]]})
    assert pairs == [("a", "AH0"), ("read", "R IY1 D"), ("read", "R EH1 D")]


def test_build_writes_three_splits_grouped_by_word(tmp_path):
    counts = build_cmudict(tmp_path, seed=1, valid_frac=0.1, test_frac=0.1, pronunciations=FAKE_DICT)
    splits = {name: read_pairs(tmp_path / f"{name}.tsv") for name in ("train", "valid", "test")}
    words = {name: {word for word, _ in pairs} for name, pairs in splits.items()}
    assert not words["train"] & words["valid"] and not words["train"] & words["test"]
    assert not words["valid"] & words["test"]
    assert {name: len(w) for name, w in words.items()} == {"train": 48, "valid": 6, "test": 6}
    assert sum(len(pairs) for pairs in splits.values()) == sum(map(len, FAKE_DICT.values()))
    assert counts["test"] == {"words": 6, "pairs": len(splits["test"])}
    # Every reference pronunciation of a test word is in the test file.
    for word in words["test"]:
        assert len([p for w, p in splits["test"] if w == word]) == len(FAKE_DICT[word])


def test_build_is_deterministic_for_a_seed(tmp_path):
    build_cmudict(tmp_path / "a", seed=3, pronunciations=FAKE_DICT)
    build_cmudict(tmp_path / "b", seed=3, pronunciations=FAKE_DICT)
    for name in ("train.tsv", "valid.tsv", "test.tsv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
