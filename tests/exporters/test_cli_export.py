"""exporters/cli.py: `seqserve export` (name validation, versions, exit codes) and `seqserve inspect`."""

from __future__ import annotations

import json

import pytest

from exporters.cli import export_main, inspect_main
from seqserve.cli import main as seqserve_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = ["--eval-limit", "10", "--greedy-inputs", "10", "--beam-inputs", "3", "--max-new-tokens", "15"]


@pytest.fixture(scope="module")
def published(tiny_runs, tmp_path_factory):
    """One LM exported through the command line: (repository, run)."""
    repository = tmp_path_factory.mktemp("cli") / "models"
    run = tiny_runs["lstm", "lm"]
    assert export_main([str(run), "--repository", str(repository), "--name", "fortunes", *QUICK]) == 0
    return repository, run


@pytest.mark.parametrize("name", ["Fortunes", "../up", ".hidden", "a/b", "-dash", "x" * 200, "a..b"])
def test_invalid_names_exit_2_and_write_nothing(tiny_runs, tmp_path, capsys, name):
    # --name=VALUE, so that a name starting with "-" reaches the validation instead of argparse.
    run = str(tiny_runs["rnn", "lm"])
    code = export_main([run, "--repository", str(tmp_path / "models"), f"--name={name}"])
    assert code == 2
    assert "model name" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


def test_unknown_variant_exits_2(tiny_runs, tmp_path, capsys):
    code = export_main([str(tiny_runs["rnn", "lm"]), "--repository", str(tmp_path), "--name", "ok",
                        "--variants", "fp16,bf16"])
    assert code == 2 and "unknown variant(s) bf16" in capsys.readouterr().err


def test_export_prints_summary_and_versions_count_up(published, capsys):
    repository, run = published
    assert (repository / "fortunes" / "1" / "manifest.json").is_file()
    assert export_main([str(run), "--repository", str(repository), "--name", "fortunes", *QUICK]) == 0
    out = capsys.readouterr().out
    assert f"published {repository / 'fortunes' / '2'}" in out
    assert "fp32 passed: log-probs" in out and "greedy 10/10" in out and "seconds: export" in out
    again = [str(run), "--repository", str(repository), "--name", "fortunes", "--version", "1", *QUICK]
    code = export_main(again)
    assert code == 1
    assert "already exists; versions are never overwritten" in capsys.readouterr().err


def test_parity_failure_exits_1_with_the_figure(published, capsys):
    repository, run = published
    code = export_main([str(run), "--repository", str(repository), "--name", "strict", "--max-abs-diff", "0",
                        *QUICK])
    assert code == 1
    assert "parity check failed, nothing was published: fp32 log-probs differ" in capsys.readouterr().err
    assert not (repository / "strict").exists()


def test_export_json_prints_the_manifest(published, capsys):
    repository, run = published
    code = export_main([str(run), "--repository", str(repository), "--name", "fortunes-json", "--json",
                        *QUICK])
    assert code == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["name"] == "fortunes-json" and manifest["kind"] == "MODEL_KIND_LM"


def test_inspect_prints_summary_and_verifies(published, capsys):
    repository, _ = published
    assert inspect_main([str(repository / "fortunes" / "1")]) == 0
    out = capsys.readouterr().out
    for expected in ("model: fortunes v1 (lm, lstm)", "hidden 12 x 2 layers",
                     "step.onnx: (tokens[batch,time]", "fp32 passed", "metrics: bits_per_character",
                     "checksums: 4 files verified"):
        assert expected in out
    assert seqserve_main(["inspect", str(repository / "fortunes" / "1"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cell"] == "lstm"


def _copy_bundle(published, tmp_path):
    import shutil

    repository, _ = published
    copy = tmp_path / "models" / "fortunes" / "1"
    shutil.copytree(repository / "fortunes" / "1", copy)
    return copy


def test_inspect_fails_on_a_changed_file(published, tmp_path, capsys):
    bundle = _copy_bundle(published, tmp_path)
    with open(bundle / "step.onnx", "r+b") as graph:
        graph.seek(100)
        byte = graph.read(1)
        graph.seek(100)
        graph.write(bytes([byte[0] ^ 0x01]))
    assert inspect_main([str(bundle)]) == 1
    assert "checksum mismatch for step.onnx" in capsys.readouterr().err


def test_inspect_fails_on_a_missing_file_and_a_bad_field(published, tmp_path, capsys):
    bundle = _copy_bundle(published, tmp_path)
    (bundle / "tokenizer.json").unlink()
    assert inspect_main([str(bundle)]) == 1
    assert "missing file tokenizer.json" in capsys.readouterr().err
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["cell"] = "transformer"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert inspect_main([str(bundle)]) == 1
    assert "field cell" in capsys.readouterr().err


def test_inspect_checks_the_directory_names(published, tmp_path, capsys):
    import shutil

    repository, _ = published
    moved = tmp_path / "models" / "renamed" / "3"
    shutil.copytree(repository / "fortunes" / "1", moved)
    assert inspect_main([str(moved)]) == 1
    err = capsys.readouterr().err
    assert "manifest names the model 'fortunes', its directory 'renamed'" in err
