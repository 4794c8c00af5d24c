"""Tests for training/data/ding.py: parsing Ding lines into clean, aligned German-English pairs."""

import pytest

from training.data import CorpusNotInstalledError
from training.data.ding import build_ding, clean_variant, entry_pairs, read_ding, remove_annotations
from training.data.files import read_pairs


def test_comments_and_lines_without_separator_give_nothing():
    assert entry_pairs("# Version :: devel 2023-01-30") == []
    assert entry_pairs("") == []
    assert entry_pairs("no separator here") == []


def test_alternatives_are_zipped_and_annotations_removed():
    line = "Aalsuppe {f} [cook.] | Aalsuppen {pl} :: eel soup | eel soups"
    assert entry_pairs(line) == [("Aalsuppe", "eel soup"), ("Aalsuppen", "eel soups")]


def test_synonyms_pair_as_a_star_around_the_first_variants():
    line = "Aalreuse {f}; Aalkorb {m} :: eel trap; weel [archaic]; eel pot"
    assert entry_pairs(line) == [
        ("Aalreuse", "eel trap"),
        ("Aalreuse", "weel"),
        ("Aalreuse", "eel pot"),
        ("Aalkorb", "eel trap"),
    ]


def test_parenthesised_glosses_angle_spellings_abbreviations_and_see_also_are_removed():
    line = (
        "(chemischer) Abbau {m} (von etw.) <Abbauung> ~Zersetzung :: "
        "breakdown (of sth.) /BD/; decomposition <decomp> ~decay"
    )
    assert entry_pairs(line) == [("Abbau", "breakdown"), ("Abbau", "decomposition")]


def test_nested_parentheses_and_semicolons_inside_annotations():
    assert remove_annotations("Bushel (Raummaß (alt)) /bu.; bsh./ x").split() == ["Bushel", "x"]
    assert entry_pairs("Scheffel {m} :: bushel /bu.; bsh./") == [("Scheffel", "bushel")]


def test_mismatched_alternative_counts_are_skipped():
    assert entry_pairs("a | b :: x") == []


def test_clean_variant_collapses_space_and_drops_stray_brackets():
    assert clean_variant("  mit   jdm. auskommen  ") == "mit jdm. auskommen"
    assert clean_variant("Nicht, dass ich wüsste .") == "Nicht, dass ich wüsste."
    assert clean_variant("geburtenstarke Jahrgänge (der Nachkriegszeit") == ""
    assert clean_variant("   ") == ""


def test_phrases_keep_their_punctuation():
    line = "Das Fischerdorf war sehr beschaulich. :: The fishing village was very quaint."
    assert entry_pairs(line) == [
        ("Das Fischerdorf war sehr beschaulich.", "The fishing village was very quaint.")
    ]


def _write_dictionary(path):
    lines = ["# comment :: line"]
    lines += [f"Wort{i} {{n}} | Wörter{i} {{pl}} :: word{i} | words{i}" for i in range(40)]
    lines += ["Wort0 {n} :: word0", "Lang :: " + "x" * 201]  # a duplicate and an over-long pair
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_read_dedupes_and_drops_overlong_pairs(tmp_path):
    source = tmp_path / "de-en"
    _write_dictionary(source)
    pairs = read_ding(source)
    assert len(pairs) == 80
    assert ("Wort0", "word0") in pairs and all(len(e) <= 200 for _, e in pairs)


def test_build_groups_identical_german_sources(tmp_path):
    source = tmp_path / "de-en"
    _write_dictionary(source)
    counts = build_ding(tmp_path / "out", seed=1, valid_frac=0.1, test_frac=0.1, source_path=source)
    splits = {name: read_pairs(tmp_path / "out" / f"{name}.tsv") for name in ("train", "valid", "test")}
    sources = {name: {g for g, _ in pairs} for name, pairs in splits.items()}
    assert not sources["train"] & sources["test"] and not sources["train"] & sources["valid"]
    assert counts["test"] == {"sources": 8, "pairs": 8}
    assert sum(c["pairs"] for c in counts.values()) == 80


def test_missing_package_names_the_install_command(tmp_path):
    with pytest.raises(CorpusNotInstalledError, match="sudo apt-get install trans-de-en"):
        read_ding(tmp_path / "nowhere")


def test_regional_spellings_joined_by_a_slash_stay_joined():
    line = "Ausklang {m} :: wind-up [Br.]/windup [Am.]; finale"
    assert entry_pairs(line) == [("Ausklang", "wind-up/windup"), ("Ausklang", "finale")]
