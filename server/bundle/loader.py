"""Opening a verified bundle for serving: ONNX Runtime sessions and tokenizers.

`seqserve.bundle.verify_bundle` needs nothing but the files (exporters and `seqserve inspect` use it);
`load_bundle` verifies the same way, then opens one ONNX Runtime session per graph and checks each
graph's real inputs and outputs against the manifest, so a bundle that loads is one the server can feed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort
from tokenizers import Tokenizer

from seqserve.bundle.checksums import verify_bundle
from seqserve.bundle.errors import BundleError
from seqserve.bundle.manifest import graphs_of_variant
from seqserve.bundle.spec import GraphSpec, ModelSpec
from seqserve.v1.manifest_pb2 import Graph, Manifest, ParityReport
from server.bundle.sessions import (
    CPU_PROVIDER,
    ProviderSpec,
    check_graph_io,
    make_session_options,
    provider_name,
    resolve_providers,
)
from server.bundle.tokenizers import DescribedBundle, open_tokenizers

logger = logging.getLogger(__name__)

DEFAULT_VARIANT = "fp32"


@dataclass(frozen=True)
class LoadedGraph:
    """One graph of a loaded bundle: its manifest entry, its typed view, and its open ONNX Runtime session."""

    spec: Graph  # the manifest's entry (the exporters' parity check and the API read it)
    io: GraphSpec  # the same, typed (the engine reads this)
    session: ort.InferenceSession
    providers: tuple[str, ...]  # what ONNX Runtime gave this session, in priority order

    @property
    def role(self) -> str:
        return self.io.role

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.io.input_names

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.io.output_names

    @property
    def state_inputs(self) -> tuple[str, ...]:
        return self.io.state_inputs

    @property
    def state_outputs(self) -> tuple[str, ...]:
        return self.io.state_outputs


@dataclass(frozen=True)
class LoadedBundle(DescribedBundle):
    """A bundle ready to serve: verified manifest, one session per graph, tokenizers by role."""

    path: Path
    manifest: Manifest  # for the API edge (ModelInfo) and the exporters; the server below it reads `spec`
    spec: ModelSpec  # the manifest's served variant, typed: what the engine, sessions and registry read
    variant: str
    graphs: Mapping[str, LoadedGraph]  # by role: "step" (and optional "prefill"), or "encoder" and "decoder_step"
    tokenizers: Mapping[str, Tokenizer]  # by role: "text", or "source" and "target"
    requested_providers: tuple[str, ...]  # as configured, before unavailable ones were dropped
    providers: tuple[str, ...]  # obtained by every session, in priority order
    load_seconds: float

    def graph(self, role: str) -> LoadedGraph:
        """The graph of `role`; BundleError if this kind has none."""
        try:
            return self.graphs[role]
        except KeyError:
            raise BundleError(
                f"bundle {self.name} v{self.version} has no {role!r} graph; it has {', '.join(self.graphs)}"
            ) from None


def load_bundle(
    bundle_dir: str | os.PathLike[str],
    providers: Sequence[ProviderSpec] = (CPU_PROVIDER,),
    session_options: Mapping[str, Any] | None = None,
    *,
    variant: str = DEFAULT_VARIANT,
    expected_name: str | None = None,
    expected_version: int | None = None,
    allow_failed_parity: bool = False,
) -> LoadedBundle:
    """Verify a bundle and open it for serving.

    `providers` are ONNX Runtime execution providers in order of preference (names, or
    `(name, options)` pairs); `session_options` are described in `make_session_options`. A variant
    whose parity report says it failed is refused unless `allow_failed_parity`.
    """
    started = time.perf_counter()
    bundle_dir = Path(bundle_dir)
    manifest = verify_bundle(bundle_dir, expected_name=expected_name, expected_version=expected_version)
    graph_specs = graphs_of_variant(manifest, variant)
    if not graph_specs:
        present = sorted({graph.variant for graph in manifest.graphs})
        raise BundleError(f"bundle {bundle_dir} has no {variant!r} graphs; it has {', '.join(present)}")
    _check_parity(bundle_dir, manifest, variant, allow_failed_parity)
    model_spec = ModelSpec.from_manifest(manifest, variant)

    if isinstance(providers, str):
        providers = [providers]  # one name, not a sequence of one-letter names
    requested = tuple(provider_name(spec) for spec in providers)
    resolved = resolve_providers(providers)
    options = make_session_options(session_options)
    graphs = {
        role: _open_graph(bundle_dir, spec, model_spec.graphs[role], options, resolved)
        for role, spec in sorted(graph_specs.items())
    }
    tokenizers = open_tokenizers(bundle_dir, manifest)

    obtained = _common_providers(list(graphs.values()))
    bundle = LoadedBundle(
        path=bundle_dir,
        manifest=manifest,
        spec=model_spec,
        variant=variant,
        graphs=graphs,
        tokenizers=tokenizers,
        requested_providers=requested,
        providers=obtained,
        load_seconds=time.perf_counter() - started,
    )
    missed = [name for name in (provider_name(spec) for spec in resolved) if name not in obtained]
    log = logger.warning if missed else logger.info
    log(
        "loaded %s v%d (%s) from %s in %.2fs: providers asked %s, obtained %s%s",
        bundle.name,
        bundle.version,
        variant,
        bundle_dir,
        bundle.load_seconds,
        list(requested),
        list(obtained),
        f" (could not start {missed})" if missed else "",
    )
    return bundle


def _open_graph(
    bundle_dir: Path, spec: Graph, io: GraphSpec, options: ort.SessionOptions, providers: list[ProviderSpec]
) -> LoadedGraph:
    path = bundle_dir / spec.file
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # ONNX Runtime raises several unrelated types for a bad model
        raise BundleError(f"bundle {bundle_dir}: ONNX Runtime cannot open {spec.file}: {error}") from error
    problems = check_graph_io(spec, session)
    if problems:
        raise BundleError(f"bundle {bundle_dir}: graph I/O mismatch: " + "; ".join(problems))
    return LoadedGraph(spec=spec, io=io, session=session, providers=tuple(session.get_providers()))


def _check_parity(bundle_dir: Path, manifest: Manifest, variant: str, allow_failed: bool) -> None:
    report: ParityReport | None = next((r for r in manifest.parity if r.variant == variant), None)
    if report is not None and not report.passed and not allow_failed:
        raise BundleError(
            f"bundle {bundle_dir}: the {variant} graphs failed their parity check "
            f"(max_abs_diff_log_probs {report.max_abs_diff_log_probs:g}, "
            f"greedy {report.greedy_matched}/{report.greedy_checked}, "
            f"beam {report.beam_matched}/{report.beam_checked})"
        )


def _common_providers(graphs: list[LoadedGraph]) -> tuple[str, ...]:
    # Sessions of one bundle normally get the same providers; if one fell back, report only what all got.
    first = graphs[0].providers
    return tuple(name for name in first if all(name in graph.providers for graph in graphs[1:]))
