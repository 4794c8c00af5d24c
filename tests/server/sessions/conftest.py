"""The tiny LSTM LM bundle, exported once for every session test module; each copies it into a model
repository of its own (a copy takes milliseconds, an export seconds)."""

from __future__ import annotations

import shutil

import pytest

from exporters.bundle import ExportOptions, export_run
from exporters.parity import ParitySettings

SMALL_EXPORT = ExportOptions(eval_limit=10, real_inputs=50,
                             parity=ParitySettings(greedy_inputs=5, beam_inputs=2, max_new_tokens=10))


@pytest.fixture(scope="session")
def tiny_lm_bundle(tiny_runs, tmp_path_factory):
    """tiny-lm/1: the tiny trained LSTM LM (embedding 8, hidden 12, 2 layers, char tokenizer)."""
    root = tmp_path_factory.mktemp("session-bundles")
    return export_run(tiny_runs["lstm", "lm"], root, "tiny-lm", version=1, options=SMALL_EXPORT).path


@pytest.fixture(scope="module")
def lm_repository(tiny_lm_bundle, tmp_path_factory):
    """A model repository of this module's own holding tiny-lm/1."""
    repository = tmp_path_factory.mktemp("repository")
    shutil.copytree(tiny_lm_bundle, repository / "tiny-lm" / "1")
    return repository
