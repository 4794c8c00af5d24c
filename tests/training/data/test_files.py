"""Tests for training/data/files.py: TSV pairs and %-separated documents."""

import pytest

from training.data.files import CorpusFormatError, read_documents, read_pairs, write_documents, write_pairs


def test_pairs_round_trip(tmp_path):
    pairs = [("hello", "HH AH0 L OW1"), ("Größe", "size"), ("hello", "HH EH0 L OW1")]
    path = tmp_path / "sub" / "pairs.tsv"
    assert write_pairs(path, pairs) == 3
    assert read_pairs(path) == pairs


def test_read_pairs_skips_empty_lines(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("a\tA\n\n   \nb\tB\r\n", encoding="utf-8")
    assert read_pairs(path) == [("a", "A"), ("b", "B")]


@pytest.mark.parametrize("line", ["no tab here", "a\tb\tc", "\tonly target"])
def test_read_pairs_names_file_and_line_of_a_malformed_line(tmp_path, line):
    path = tmp_path / "pairs.tsv"
    path.write_text(f"ok\tOK\n{line}\n", encoding="utf-8")
    with pytest.raises(CorpusFormatError, match=r"pairs\.tsv:2:"):
        read_pairs(path)


@pytest.mark.parametrize("pair", [("a\tb", "c"), ("a", "b\nc"), ("", "x")])
def test_write_pairs_refuses_fields_that_would_not_read_back(tmp_path, pair):
    with pytest.raises(CorpusFormatError):
        write_pairs(tmp_path / "pairs.tsv", [pair])


def test_documents_round_trip_with_blank_lines_and_indentation(tmp_path):
    documents = ["One line.", "Two\n\nparagraphs.", "Quote.\n\t\t-- Someone", "100% sure"]
    path = tmp_path / "docs.txt"
    assert write_documents(path, documents) == 4
    assert path.read_text(encoding="utf-8").count("\n%\n") == 4
    assert read_documents(path) == documents


def test_plain_text_without_separators_is_one_document_per_line(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("first line\n\nsecond line\n  \nthird\n", encoding="utf-8")
    assert read_documents(path) == ["first line", "second line", "third"]


def test_percent_format_trims_surrounding_blank_lines_and_skips_empty_documents(tmp_path):
    path = tmp_path / "fortunes"
    path.write_text("\nfirst\n\n%\n%\n  second\n%\nthird", encoding="utf-8")
    assert read_documents(path) == ["first", "  second", "third"]


@pytest.mark.parametrize("document", ["", "   ", "before\n%\nafter"])
def test_write_documents_refuses_documents_that_would_not_read_back(tmp_path, document):
    with pytest.raises(CorpusFormatError):
        write_documents(tmp_path / "docs.txt", [document])
