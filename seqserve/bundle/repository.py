"""The model repository: models/NAME/VERSION/ directories, laid out, found by scanning, resolved by version.

Directories starting with "." are an exporter's work in progress (it publishes by renaming one into
place), so a scan never sees half a bundle. Scanning reads no manifests: a version directory whose
bundle is broken is still listed, and loading it says what is wrong.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from seqserve.bundle.errors import BundleError, ModelNotFoundError
from seqserve.bundle.manifest import validate_name, validate_version

logger = logging.getLogger(__name__)

HIDDEN_PREFIX = "."  # names a scan skips
STAGING_PREFIX = HIDDEN_PREFIX + "staging-"  # where an exporter writes a bundle before renaming it into place

Repository = dict[str, dict[int, Path]]


def scan_repository(root: str | os.PathLike[str]) -> Repository:
    """Every model of the repository at `root`: name -> version -> bundle directory, both ascending.

    Hidden directories, files, invalid names and non-integer versions are skipped; models with no
    version are left out.
    """
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"model repository {root} is not a directory")
    repository: Repository = {}
    for model_dir in sorted(root.iterdir()):
        if not _is_candidate(model_dir):
            continue
        try:
            name = validate_name(model_dir.name)
        except ValueError as error:
            logger.warning("skipping %s in the model repository: %s", model_dir, error)
            continue
        versions: dict[int, Path] = {}
        for version_dir in model_dir.iterdir():
            if not _is_candidate(version_dir):
                continue
            try:
                versions[validate_version(version_dir.name)] = version_dir
            except ValueError as error:
                logger.warning("skipping %s in the model repository: %s", version_dir, error)
        if versions:
            repository[name] = dict(sorted(versions.items()))
    return repository


def bundle_path(root: str | os.PathLike[str], name: str, version: int) -> Path:
    """Where version `version` of model `name` lives in the repository at `root`: root/NAME/VERSION.

    The one place the layout is spelled; both parts are validated, so neither can be read as a path.
    """
    return Path(root) / validate_name(name) / str(validate_version(version))


def latest_version(versions: Mapping[int, Path]) -> int:
    """The highest version, the one served when a request does not pin one."""
    if not versions:
        raise ModelNotFoundError("the model has no versions")
    return max(versions)


def resolve_version(
    repository: Mapping[str, Mapping[int, Path]], name: str, version: int = 0
) -> tuple[int, Path]:
    """The (version, directory) a request for `name` at `version` (0 = latest) gets."""
    versions = repository.get(name)
    if not versions:
        known = ", ".join(sorted(repository)) or "none"
        raise ModelNotFoundError(f"unknown model {name!r}; the repository has {known}")
    if version == 0:
        version = latest_version(versions)
    if version not in versions:
        raise ModelNotFoundError(
            f"model {name!r} has no version {version}; it has {', '.join(map(str, sorted(versions)))}"
        )
    return version, versions[version]


def _is_candidate(path: Path) -> bool:
    if path.name.startswith(HIDDEN_PREFIX):
        logger.debug("skipping hidden %s in the model repository", path)
        return False
    return path.is_dir()
