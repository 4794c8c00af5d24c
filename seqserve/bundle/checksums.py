"""Checksums and verification: a bundle is usable only if its manifest holds and every file is the one
the exporter wrote. Reads files and the manifest only, so the exporters and the server share it without
ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from seqserve.bundle.errors import BundleError
from seqserve.bundle.manifest import MANIFEST_FILE, read_manifest
from seqserve.v1.manifest_pb2 import Manifest

_CHUNK_BYTES = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks so large graphs never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_bundle(
    bundle_dir: str | os.PathLike[str],
    *,
    expected_name: str | None = None,
    expected_version: int | None = None,
) -> Manifest:
    """Validate a bundle's manifest and the checksum of every file; return the manifest.

    `expected_name` and `expected_version`, when given (a repository's directory names), must match
    the manifest's, so a bundle copied under another name or version is refused.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory {bundle_dir} does not exist")
    manifest = read_manifest(bundle_dir / MANIFEST_FILE)
    if expected_name is not None and manifest.name != expected_name:
        raise BundleError(
            f"bundle {bundle_dir}: the manifest names the model {manifest.name!r}, "
            f"its directory {expected_name!r}"
        )
    if expected_version is not None and manifest.version != expected_version:
        raise BundleError(
            f"bundle {bundle_dir}: manifest says version {manifest.version}, its directory {expected_version}"
        )
    problems = []
    for file_name, expected in sorted(manifest.sha256.items()):
        path = bundle_dir / file_name
        if not path.is_file():
            problems.append(f"missing file {file_name}")
            continue
        actual = sha256_file(path)
        if actual != expected:
            problems.append(f"checksum mismatch for {file_name}: expected {expected}, got {actual}")
    if problems:
        raise BundleError(f"bundle {bundle_dir}: " + "; ".join(problems))
    return manifest
