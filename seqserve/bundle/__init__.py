"""The model bundle, the one contract between the exporters and the server.

The manifest schema (`manifest`), the repository layout (`repository`: models/NAME/VERSION/), checksums
and verification (`checksums`), and `ModelSpec` (`spec`), the typed view of a manifest the server reads.
This package imports neither torch nor ONNX Runtime (`lint-imports` checks it): the exporters write
bundles with it, the server reads them with it, and opening a bundle for serving
(`server.bundle.load_bundle`) is the server's.
"""

from seqserve.bundle.checksums import sha256_file, verify_bundle
from seqserve.bundle.errors import BundleError, ManifestError, ModelNotFoundError
from seqserve.bundle.manifest import (
    MANIFEST_FILE,
    manifest_to_json,
    parse_manifest,
    read_manifest,
    validate_manifest,
    validate_name,
    validate_version,
    write_manifest,
)
from seqserve.bundle.repository import bundle_path, latest_version, resolve_version, scan_repository

__all__ = [
    "MANIFEST_FILE",
    "BundleError",
    "ManifestError",
    "ModelNotFoundError",
    "bundle_path",
    "latest_version",
    "manifest_to_json",
    "parse_manifest",
    "read_manifest",
    "resolve_version",
    "scan_repository",
    "sha256_file",
    "validate_manifest",
    "validate_name",
    "validate_version",
    "verify_bundle",
    "write_manifest",
]
