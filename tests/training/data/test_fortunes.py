"""Tests for training/data/fortunes.py: reading, cleaning and splitting fortune files."""

import os

import pytest

from training.data import CorpusNotInstalledError
from training.data.files import read_documents
from training.data.fortunes import (
    build_fortunes,
    clean_fortune,
    fortune_files,
    read_fortune_file,
    read_fortunes,
    repair_mojibake,
    resolve_overstrike,
)


def test_overstrike_keeps_what_a_terminal_shows():
    assert resolve_overstrike("the ____\b\b\b\bLAST time") == "the LAST time"
    assert resolve_overstrike("_\bb_\bo_\bl_\bd") == "bold"
    assert resolve_overstrike("no backspace") == "no backspace"


def test_clean_removes_bells_trailing_space_and_outer_blank_lines_only():
    text = "\n\nBeep\a here.   \n\n\tIndented\t-- Author  \n\n"
    assert clean_fortune(text) == "Beep here.\n\n\tIndented\t-- Author"


def test_read_fortune_file_splits_on_percent_lines(tmp_path):
    path = tmp_path / "wisdom"
    path.write_text(
        "First.\n%\nSecond,\n\ntwo paragraphs.\n%\n%DCL-MEM-BAD stays text\n%\n", encoding="utf-8"
    )
    assert read_fortune_file(path) == ["First.", "Second,\n\ntwo paragraphs.", "%DCL-MEM-BAD stays text"]


def _fortune_dir(tmp_path, n=40):
    directory = tmp_path / "fortunes"
    directory.mkdir()
    (directory / "a").write_text("\n%\n".join(f"Fortune a{i}." for i in range(n)) + "\n%\n", encoding="utf-8")
    (directory / "b").write_text("Fortune a0.\n%\nOnly in b.\n", encoding="utf-8")  # a0 is a duplicate
    (directory / "a.dat").write_bytes(b"\x00\x02binary index")
    os.symlink(directory / "a", directory / "a.u8")
    (directory / "off").mkdir()
    (directory / "off" / "c").write_text("Offensive.\n", encoding="utf-8")
    return directory


def test_only_plain_fortune_files_are_read_and_duplicates_kept_once(tmp_path):
    directory = _fortune_dir(tmp_path)
    assert [path.name for path in fortune_files(directory)] == ["a", "b"]
    fortunes = read_fortunes(directory)
    assert len(fortunes) == 41 and "Only in b." in fortunes and "Offensive." not in fortunes


def test_build_writes_documents_split_by_fortune(tmp_path):
    directory = _fortune_dir(tmp_path)
    counts = build_fortunes(tmp_path / "out", seed=1, valid_frac=0.1, test_frac=0.1, fortune_dir=directory)
    splits = {name: read_documents(tmp_path / "out" / f"{name}.txt") for name in ("train", "valid", "test")}
    assert {name: len(docs) for name, docs in splits.items()} == {"train": 33, "valid": 4, "test": 4}
    assert counts["valid"]["fortunes"] == 4
    assert sorted(sum(splits.values(), [])) == read_fortunes(directory)


def test_missing_package_names_the_install_command(tmp_path):
    with pytest.raises(CorpusNotInstalledError, match="sudo apt-get install fortunes"):
        fortune_files(tmp_path / "nowhere")


def test_build_is_deterministic_for_a_seed(tmp_path):
    directory = _fortune_dir(tmp_path)
    build_fortunes(tmp_path / "one", seed=5, fortune_dir=directory)
    build_fortunes(tmp_path / "two", seed=5, fortune_dir=directory)
    for name in ("train.txt", "valid.txt", "test.txt"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_doubly_encoded_utf8_is_repaired():
    once = "don’t".encode().decode("latin-1")  # "donâ\x80\x99t"
    twice = "Here’s it".encode().decode("latin-1").encode().decode("latin-1")  # "HereÃ¢Â\x80Â\x99s it"
    assert repair_mojibake(once) == "don’t"
    assert clean_fortune(twice) == "Here’s it"
    assert repair_mojibake("Größe, naïve, “quoted”") == "Größe, naïve, “quoted”"
