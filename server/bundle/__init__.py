"""Opening bundles for serving: ONNX Runtime sessions and tokenizers (`LoadedBundle`).

The bundle contract itself (manifest schema, repository layout, checksums) is `seqserve.bundle`; the names
re-exported here from it keep older imports working, and new code imports them from `seqserve.bundle`.
`server.bundle.loader.load_bundle` is the exporters' one entry into the server: the runtime loader judges
a freshly written bundle before it is published.
"""

from seqserve.bundle import (
    MANIFEST_FILE,
    BundleError,
    ManifestError,
    ModelNotFoundError,
    latest_version,
    parse_manifest,
    read_manifest,
    resolve_version,
    scan_repository,
    sha256_file,
    validate_manifest,
    validate_name,
    validate_version,
    verify_bundle,
    write_manifest,
)
from server.bundle.loader import DEFAULT_VARIANT, LoadedBundle, LoadedGraph, load_bundle
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
