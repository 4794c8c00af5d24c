"""Tests for training/metrics.py on hand-made cases with known answers."""

import math

import pytest

from training.metrics import (
    bits_per_unit,
    bleu,
    chrf,
    closest_reference,
    edit_distance,
    perplexity,
    phoneme_error_rate,
    strip_stress,
    word_error_rate,
)


@pytest.mark.parametrize(
    "hyp,ref,distance",
    [
        ("", "", 0),
        ("A B C", "A B C", 0),
        ("A B C", "A X C", 1),  # substitution
        ("A B C", "A C", 1),  # one extra hyp token
        ("A C", "A B C", 1),  # one missing hyp token
        ("", "A B", 2),
        ("K AE1 T", "T AE1 K", 2),
        ("k i t t e n", "s i t t i n g", 3),  # the textbook case
    ],
)
def test_edit_distance(hyp, ref, distance):
    assert edit_distance(hyp.split(), ref.split()) == distance
    assert edit_distance(ref.split(), hyp.split()) == distance


def test_word_error_rate_counts_words_matching_no_reference():
    hyps = ["R IY1 D", "K AE1 T", "D AO1 G"]
    refs = [["R EH1 D", "R IY1 D"], ["K AH1 T"], ["D AA1 G"]]
    assert word_error_rate(hyps, refs) == pytest.approx(2 / 3)


def test_word_error_rate_ignores_extra_whitespace_but_not_stress():
    assert word_error_rate(["AH0  B"], [["AH0 B"]]) == 0.0
    assert word_error_rate(["AH1 B"], [["AH0 B"]]) == 1.0


def test_phoneme_error_rate_uses_the_closest_reference():
    # Closest to "R EH1 D" is the second reference (0 edits), not the first (1 edit).
    assert phoneme_error_rate(["R EH1 D"], [["R IY1 D", "R EH1 D"]]) == 0.0
    # 1 edit against a 3-phoneme reference, then 2 edits against either 5-phoneme one: 3 / 8.
    hyps = ["K AE1 D", "S T AA1"]
    refs = [["K AE1 T"], ["S T AA1 R Z", "S T AA1 R T"]]
    assert phoneme_error_rate(hyps, refs) == pytest.approx(3 / 8)


def test_closest_reference_prefers_the_first_on_ties():
    assert closest_reference("A B", ["A C", "A D"]) == (1, "A C")


def test_closest_reference_length_is_the_denominator():
    # "A" is 1 edit from "A B" and 2 from "A B C": the closer, shorter reference is the denominator.
    assert phoneme_error_rate(["A"], [["A B C", "A B"]]) == pytest.approx(1 / 2)


def test_strip_stress():
    assert strip_stress("AH0 B AW1 T") == "AH B AW T"
    assert strip_stress("HH  EH2 L") == "HH EH L"


@pytest.mark.parametrize("metric", [word_error_rate, phoneme_error_rate, bleu, chrf])
def test_mismatched_or_empty_inputs_are_refused(metric):
    with pytest.raises(ValueError, match="hypotheses"):
        metric(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        metric([], [])
    with pytest.raises(ValueError, match="non-empty list"):
        metric(["a"], [[]])
    with pytest.raises(ValueError, match="non-empty list"):
        metric(["a"], ["a"])  # a bare string instead of a list of references


def test_bleu_and_chrf_are_100_for_exact_matches_and_lower_otherwise():
    hyps = ["the cat sat on the mat", "a dog barked loudly"]
    assert bleu(hyps, [[h] for h in hyps]) == pytest.approx(100.0)
    assert chrf(hyps, [[h] for h in hyps]) == pytest.approx(100.0)
    wrong = [["the cat sat on a rug"], ["a bird sang softly"]]
    assert 0.0 < bleu(hyps, wrong) < 100.0
    assert 0.0 < chrf(hyps, wrong) < 100.0
    assert isinstance(bleu(hyps, wrong), float)


def test_bleu_uses_every_reference_and_handles_ragged_lists():
    hyps = ["the cat sat on the mat", "a dog barked loudly"]
    one_ref = [["the cat is on the mat"], ["a dog barked loudly"]]
    ragged = [["the cat is on the mat", "the cat sat on the mat"], ["a dog barked loudly"]]
    assert bleu(hyps, ragged) == pytest.approx(100.0)
    assert bleu(hyps, ragged) > bleu(hyps, one_ref)
    assert chrf(hyps, ragged) == pytest.approx(100.0)


def test_padding_with_the_first_reference_changes_nothing():
    hyps = ["the cat sat on the mat", "a dog barked"]
    assert bleu(hyps, [["the cat is on a mat"], ["a dog barked loudly"]]) == pytest.approx(
        bleu(hyps, [["the cat is on a mat", "the cat is on a mat"], ["a dog barked loudly"] * 2])
    )


def test_perplexity_and_bits_per_unit():
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
    assert bits_per_unit(8 * math.log(2), 8) == pytest.approx(1.0)
    assert bits_per_unit(3 * math.log(8), 3) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="n_tokens"):
        perplexity(1.0, 0)
    with pytest.raises(ValueError, match="n_units"):
        bits_per_unit(1.0, 0)
