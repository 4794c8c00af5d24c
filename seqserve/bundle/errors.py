"""Errors of the bundle layer: each message names the file, field or tensor that is wrong."""

from __future__ import annotations


class BundleError(Exception):
    """A bundle (or a model repository) cannot be used; the message says what is wrong with it."""


class ManifestError(BundleError):
    """manifest.json breaks the schema; `violations` lists (field path, problem) pairs."""

    def __init__(self, source: str, violations: list[tuple[str, str]]) -> None:
        self.source = source
        self.violations = list(violations)
        lines = [f"schema violation at field {field}: {problem}" for field, problem in self.violations]
        super().__init__(f"{source}: " + "; ".join(lines))


class ModelNotFoundError(LookupError):
    """A model name or version that the repository does not hold."""
