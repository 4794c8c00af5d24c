"""Model bundles: the manifest schema, checksum verification, ONNX Runtime loading, repository scans.

The bundle is the only contract between the exporters and the server, so this package imports
neither torch nor the training code.
"""

from server.bundle.errors import BundleError, ManifestError, ModelNotFoundError
from server.bundle.loader import (
    DEFAULT_VARIANT,
    LoadedBundle,
    LoadedGraph,
    load_bundle,
    sha256_file,
    verify_bundle,
)
from server.bundle.manifest import (
    MANIFEST_FILE,
    parse_manifest,
    read_manifest,
    validate_manifest,
    validate_name,
    validate_version,
    write_manifest,
)
from server.bundle.repository import latest_version, resolve_version, scan_repository
from server.bundle.sessions import CPU_PROVIDER, check_graph_io, make_session_options, resolve_providers

__all__ = [
    "CPU_PROVIDER",
    "DEFAULT_VARIANT",
    "MANIFEST_FILE",
    "BundleError",
    "LoadedBundle",
    "LoadedGraph",
    "ManifestError",
    "ModelNotFoundError",
    "check_graph_io",
    "latest_version",
    "load_bundle",
    "make_session_options",
    "parse_manifest",
    "read_manifest",
    "resolve_providers",
    "resolve_version",
    "scan_repository",
    "sha256_file",
    "validate_manifest",
    "validate_name",
    "validate_version",
    "verify_bundle",
    "write_manifest",
]
