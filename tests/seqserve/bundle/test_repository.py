"""Tests of seqserve/bundle/repository.py: which directories a scan sees and how versions resolve."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqserve.bundle import (
    BundleError,
    ModelNotFoundError,
    bundle_path,
    latest_version,
    resolve_version,
    scan_repository,
)
from seqserve.bundle.repository import STAGING_PREFIX


def _make(root: Path, *relative: str) -> None:
    for path in relative:
        (root / path).mkdir(parents=True)


def test_scan_sees_valid_names_and_versions_only(tmp_path: Path) -> None:
    _make(
        tmp_path,
        "g2p-en/1",
        "g2p-en/2",
        "g2p-en/10",
        "g2p-en/.11.tmp",  # an export in progress
        "g2p-en/latest",
        "g2p-en/01",
        "g2p-en/0",  # not canonical positive integers
        "fortunes.lm/4",
        ".staging/1",
        f"{STAGING_PREFIX}g2p-en-3-abc/1",  # where the exporter writes a bundle before it publishes it
        "Upper/1",
        "no-versions/notes",
    )
    (tmp_path / "README.txt").write_text("not a model")
    (tmp_path / "fortunes.lm" / "5").write_text("a file, not a bundle")

    repository = scan_repository(tmp_path)

    assert repository == {
        "fortunes.lm": {4: tmp_path / "fortunes.lm" / "4"},
        "g2p-en": {
            1: tmp_path / "g2p-en" / "1",
            2: tmp_path / "g2p-en" / "2",
            10: tmp_path / "g2p-en" / "10",
        },
    }
    assert list(repository["g2p-en"]) == [1, 2, 10]  # numeric order, not string order


def test_scan_of_a_missing_repository_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="is not a directory"):
        scan_repository(tmp_path / "absent")


def test_latest_version_is_the_highest(tmp_path: Path) -> None:
    _make(tmp_path, "m/2", "m/9", "m/10")
    repository = scan_repository(tmp_path)

    assert latest_version(repository["m"]) == 10
    assert resolve_version(repository, "m") == (10, tmp_path / "m" / "10")
    assert resolve_version(repository, "m", 9) == (9, tmp_path / "m" / "9")
    with pytest.raises(ModelNotFoundError):
        latest_version({})


def test_unknown_models_and_versions_are_named(tmp_path: Path) -> None:
    _make(tmp_path, "m/1", "n/1")
    repository = scan_repository(tmp_path)

    with pytest.raises(ModelNotFoundError, match="unknown model 'x'; the repository has m, n"):
        resolve_version(repository, "x")
    with pytest.raises(ModelNotFoundError, match="model 'm' has no version 3; it has 1"):
        resolve_version(repository, "m", 3)


def test_bundle_path_is_name_then_version_and_refuses_paths(tmp_path: Path) -> None:
    assert bundle_path(tmp_path, "lm", 3) == tmp_path / "lm" / "3"
    with pytest.raises(ValueError, match="never a path"):
        bundle_path(tmp_path, "../etc", 1)
    with pytest.raises(ValueError, match="out of range"):
        bundle_path(tmp_path, "lm", 0)
