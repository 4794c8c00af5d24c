"""Tests for training/data/cli.py: `seqserve data ...` argument handling and error reporting."""

import pytest

from training.data.cli import main


def test_fortunes_subcommand_builds_and_prints_counts(tmp_path, capsys):
    source = tmp_path / "fortunes"
    source.mkdir()
    (source / "a").write_text("\n%\n".join(f"Fortune {i}." for i in range(20)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["fortunes", "--out", str(out), "--source", str(source), "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert "train.txt: 18 fortunes" in printed and "test.txt: 1 fortunes" in printed
    assert (out / "valid.txt").exists()


def test_missing_package_is_a_message_and_exit_code_not_a_traceback(tmp_path, capsys):
    assert main(["ding", "--out", str(tmp_path), "--source", str(tmp_path / "missing")]) == 1
    assert "sudo apt-get install trans-de-en" in capsys.readouterr().err


def test_bad_fraction_is_reported(tmp_path, capsys):
    source = tmp_path / "de-en"
    source.write_text("a :: b\n", encoding="utf-8")
    assert main(["ding", "--out", str(tmp_path), "--source", str(source), "--test-frac", "1.5"]) == 1
    assert "test_frac" in capsys.readouterr().err


def test_unknown_corpus_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        main(["wikipedia", "--out", "x"])
    assert exit_info.value.code == 2
