"""ModelSpec: what the server needs to know about a model, read once from its manifest.

The manifest is a protobuf message; below the API edge the server reads this typed, immutable view of
it instead: the kind, the special ids, the vocabulary sizes, each graph's inputs, outputs and state
names, the state and memory shapes, the tokenizer roles. Everything derived from the manifest (the kind,
the state shapes) is derived here, once.
"""

from __future__ import annotations

import enum
import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from seqserve.bundle.errors import BundleError
from seqserve.bundle.manifest import graphs_of_variant
from seqserve.v1.manifest_pb2 import Graph, Manifest
from seqserve.v1.manifest_pb2 import ModelKind as PbModelKind


class ModelKind(str, enum.Enum):
    """What a model does: continue a text (LM) or translate one (seq2seq); equal to its value, "lm" or "seq2seq"."""

    LM = "lm"
    SEQ2SEQ = "seq2seq"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def from_pb(cls, kind: int) -> ModelKind:
        try:
            return _KINDS_BY_PB[kind]
        except KeyError:
            raise BundleError(f"unknown model kind {kind}") from None

    def to_pb(self) -> int:
        """The manifest's (and the API's) enum value."""
        return _PB_BY_KIND[self]


_KINDS_BY_PB = {PbModelKind.MODEL_KIND_LM: ModelKind.LM, PbModelKind.MODEL_KIND_SEQ2SEQ: ModelKind.SEQ2SEQ}
_PB_BY_KIND = {kind: value for value, kind in _KINDS_BY_PB.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of a graph: name, dtype, and shape (ints, or symbolic names such as "batch")."""

    name: str
    dtype: str
    shape: tuple[str, ...]

    @property
    def fixed_shape(self) -> tuple[int, ...]:
        """The non-batch axes, fixed at export as ints; -1 for an axis left symbolic."""
        return tuple(int(d) if d.isdigit() else -1 for d in self.shape[1:])


@dataclass(frozen=True)
class GraphSpec:
    """One graph of the served variant: its file, its tensors in order, its recurrent state names."""

    role: str
    file: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    state_inputs: tuple[str, ...]
    state_outputs: tuple[str, ...]

    @classmethod
    def from_pb(cls, graph: Graph) -> GraphSpec:
        def tensors(specs) -> tuple[TensorInfo, ...]:
            return tuple(TensorInfo(t.name, t.dtype, tuple(t.shape)) for t in specs)

        return cls(graph.role, graph.file, tensors(graph.inputs), tensors(graph.outputs),
                   tuple(graph.state_inputs), tuple(graph.state_outputs))

    @functools.cached_property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @functools.cached_property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @functools.cached_property
    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Each state input's non-batch axes, in `state_inputs` order (batch first)."""
        return tuple(self.input(name).fixed_shape for name in self.state_inputs)

    def input(self, name: str) -> TensorInfo:
        for tensor in self.inputs:
            if tensor.name == name:
                return tensor
        raise BundleError(f"graph {self.role!r} has no input {name!r}; it has {', '.join(self.input_names)}")


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    bos: int
    eos: int
    unk: int


@dataclass(frozen=True)
class ModelSpec:
    """A model as the engine, the sessions and the registry see it (built by `from_manifest`)."""

    name: str
    version: int
    kind: ModelKind
    cell: str
    variant: str
    special: SpecialIds
    vocab_size: int  # the generated (target) vocabulary
    source_vocab_size: int  # seq2seq: the source vocabulary; 0 for an LM
    graphs: Mapping[str, GraphSpec]  # by role, the served variant's
    tokenizer_roles: tuple[str, ...]  # "text", or "source" and "target"
    state_role: str  # the graph whose state goes in and comes out step after step
    state_names: tuple[str, ...]  # in manifest order
    state_shapes: tuple[tuple[int, ...], ...]  # each state tensor's non-batch axes (batch first)
    memory_size: int | None  # seq2seq: the encoder memory's last axis (M); None for an LM
    checksums: Mapping[str, str]  # file name -> SHA-256, as the manifest lists them

    @classmethod
    def from_manifest(cls, manifest: Manifest, variant: str) -> ModelSpec:
        """The spec of `manifest`'s `variant`; the manifest is assumed valid (`verify_bundle` checked it)."""
        kind = ModelKind.from_pb(manifest.kind)
        pb_graphs = graphs_of_variant(manifest, variant)
        graphs = {role: GraphSpec.from_pb(graph) for role, graph in sorted(pb_graphs.items())}
        state_role = "step" if kind is ModelKind.LM else "decoder_step"
        if state_role not in graphs:
            raise BundleError(f"bundle {manifest.name} v{manifest.version} has no {variant!r} {state_role!r} graph")
        state_graph = graphs[state_role]
        memory_size = None if kind is ModelKind.LM else state_graph.input("memory").fixed_shape[-1]
        special = manifest.special_tokens
        sizes = manifest.sizes
        return cls(
            name=manifest.name,
            version=manifest.version,
            kind=kind,
            cell=manifest.cell,
            variant=variant,
            special=SpecialIds(special.pad_id, special.bos_id, special.eos_id, special.unk_id),
            vocab_size=sizes.vocab_size,
            source_vocab_size=sizes.source_vocab_size,
            graphs=MappingProxyType(graphs),
            tokenizer_roles=tuple(sorted(manifest.tokenizers)),
            state_role=state_role,
            state_names=state_graph.state_inputs,
            state_shapes=state_graph.state_shapes,
            memory_size=memory_size,
            checksums=MappingProxyType(dict(sorted(manifest.sha256.items()))),
        )

    @functools.cached_property
    def identity(self) -> str:
        """The bundle's identity: SHA-256 over its files' checksums, 16 hex digits (sessions carry it, so a
        session moved to another server resumes only on the same bundle)."""
        digest = hashlib.sha256()
        for name, value in self.checksums.items():  # sorted by name
            digest.update(f"{name}={value}\n".encode())
        return digest.hexdigest()[:16]

    @property
    def is_lm(self) -> bool:
        return self.kind is ModelKind.LM

    @property
    def output_tokenizer_role(self) -> str:
        """The tokenizer that decodes generated ids: "text" for an LM, "target" for seq2seq."""
        return "text" if self.is_lm else "target"

    def graph(self, role: str) -> GraphSpec:
        try:
            return self.graphs[role]
        except KeyError:
            raise BundleError(
                f"bundle {self.name} v{self.version} has no {role!r} graph; it has {', '.join(self.graphs)}"
            ) from None
