"""Opening bundles for serving: ONNX Runtime sessions and tokenizers (`LoadedBundle`).

The bundle contract itself (manifest schema, repository layout, checksums, `ModelSpec`) is `seqserve.bundle`,
imported from there and nowhere else. `server.bundle.loader.load_bundle` is the exporters' one entry into
the server: the runtime loader judges a freshly written bundle before it is published.
"""

from server.bundle.loader import DEFAULT_VARIANT, LoadedBundle, LoadedGraph, load_bundle
from server.bundle.sessions import CPU_PROVIDER, check_graph_io, make_session_options, resolve_providers

__all__ = [
    "CPU_PROVIDER",
    "DEFAULT_VARIANT",
    "LoadedBundle",
    "LoadedGraph",
    "check_graph_io",
    "load_bundle",
    "make_session_options",
    "resolve_providers",
]
