"""Reading, validating and writing manifest.json, the seqserve.v1.Manifest message in proto3 JSON.

The protobuf message fixes the fields and their types (an unknown field is an error); this module adds
the rules a type system cannot say: allowed values, the graphs and tokenizers each kind needs, and a
checksum for every file.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from pathlib import Path

from google.protobuf import json_format

from seqserve.bundle.errors import BundleError, ManifestError
from seqserve.v1.manifest_pb2 import Graph, Manifest, ModelKind, TensorSpec

MANIFEST_FILE = "manifest.json"
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})

CELLS = ("lstm", "gru", "rnn")
ATTENTIONS = ("", "dot", "general", "bahdanau")
VARIANTS = ("fp32", "fp16", "int8")
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")

# Graph roles whose state goes in and comes back out, step after step; the encoder only makes the
# decoder's initial state.
RECURRENT_ROLES = frozenset({"step", "decoder_step", "prefill"})
LAST_LOG_PROBS = "last_log_probs"
# The roles every variant of a kind must have.
GRAPH_ROLES_BY_KIND = {
    ModelKind.MODEL_KIND_LM: ("step",),
    ModelKind.MODEL_KIND_SEQ2SEQ: ("encoder", "decoder_step"),
}
# Roles a variant may have besides: an LM's `prefill` graph (step's inputs; step's state outputs, then
# LAST_LOG_PROBS, the log-probs after each row's last token). Bundles exported before it have none and
# the server prefills through `step`; some have one without LAST_LOG_PROBS (state only).
OPTIONAL_GRAPH_ROLES_BY_KIND = {
    ModelKind.MODEL_KIND_LM: ("prefill",),
    ModelKind.MODEL_KIND_SEQ2SEQ: (),
}
TOKENIZER_ROLES_BY_KIND = {
    ModelKind.MODEL_KIND_LM: ("text",),
    ModelKind.MODEL_KIND_SEQ2SEQ: ("source", "target"),
}

# Model names become directory names, so anything that could be read as a path is refused.
_MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_MODEL_NAME_MAX_LENGTH = 128
_MAX_VERSION = 2**31 - 1  # versions are int32 in the API
# Files are named inside the bundle directory: one plain path component, never hidden.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SYMBOLIC_DIM = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def validate_name(name: str) -> str:
    """Return `name` if it is a valid model name, else raise ValueError saying why."""
    if not isinstance(name, str) or not name:
        raise ValueError("model name is empty")
    if len(name) > _MODEL_NAME_MAX_LENGTH:
        raise ValueError(f"model name {name!r} is longer than {_MODEL_NAME_MAX_LENGTH} characters")
    if ".." in name or not _MODEL_NAME.fullmatch(name):
        raise ValueError(
            f"model name {name!r} is not valid: names are [a-z0-9][a-z0-9._-]* without '..', never a path"
        )
    return name


def validate_version(version: int | str) -> int:
    """Return `version` as an int if it is a positive integer (or its canonical decimal string)."""
    if isinstance(version, str):
        # Only the canonical spelling, so "01" and "1" can never be two directories for one version.
        if not version.isascii() or not version.isdigit() or version != str(int(version)):
            raise ValueError(f"model version {version!r} is not a positive integer")
        version = int(version)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"model version {version!r} is not an integer")
    if not 1 <= version <= _MAX_VERSION:
        raise ValueError(f"model version {version} is out of range [1, {_MAX_VERSION}]")
    return version


def is_valid_file_name(file_name: str) -> bool:
    """Whether `file_name` names a file directly inside a bundle directory."""
    return bool(_FILE_NAME.fullmatch(file_name)) and file_name != MANIFEST_FILE


def parse_manifest(text: str, source: str = MANIFEST_FILE) -> Manifest:
    """Parse and validate manifest JSON; `source` names it in error messages."""
    manifest = Manifest()
    try:
        json_format.Parse(text, manifest, ignore_unknown_fields=False)
    except json_format.ParseError as error:
        # The first line says what and where; json_format then lists every field in camelCase.
        problem = str(error).splitlines()[0]
        raise ManifestError(source, [(_field_of_parse_error(problem), problem)]) from error
    validate_manifest(manifest, source)
    return manifest


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate a manifest file; raise BundleError if it is missing or invalid."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(f"missing file {path.name} in bundle {path.parent}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BundleError(f"cannot read {path}: {error}") from error
    return parse_manifest(text, str(path))


def manifest_to_json(manifest: Manifest) -> str:
    """The canonical text of a manifest: snake_case fields, sorted keys, two-space indent.

    Fields at their default (pad_id 0, an LM's encoder sizes) are written too, so a person reading
    the file sees every field rather than guessing what an absent one means.
    """
    text = json_format.MessageToJson(
        manifest,
        preserving_proto_field_name=True,
        sort_keys=True,
        indent=2,
        ensure_ascii=False,
        always_print_fields_with_no_presence=True,
    )
    return text + "\n"


def write_manifest(manifest: Manifest, path: str | os.PathLike[str], *, validate: bool = True) -> None:
    """Write `manifest` to `path` atomically, validating it first unless `validate` is False."""
    path = Path(path)
    if validate:
        validate_manifest(manifest, str(path))
    text = manifest_to_json(manifest)
    # Write beside the target and rename, so a reader never sees half a manifest.
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def validate_manifest(manifest: Manifest, source: str = MANIFEST_FILE) -> None:
    """Raise ManifestError listing every rule `manifest` breaks; return if it breaks none."""
    violations = _ManifestRules(manifest).violations()
    if violations:
        raise ManifestError(source, violations)


def graphs_of_variant(manifest: Manifest, variant: str) -> dict[str, Graph]:
    """The graphs of one variant, by role."""
    return {graph.role: graph for graph in manifest.graphs if graph.variant == variant}


def _field_of_parse_error(message: str) -> str:
    # json_format says e.g. 'no field named "hiden_size" at "Manifest.sizes"'; turn that into the
    # path the semantic rules use ("sizes.hiden_size"), or "Manifest" when it names no place.
    unknown = re.search(r'no field named "([^"]+)" at "([^"]+)"', message)
    if unknown:
        return _relative_path(f"{unknown.group(2)}.{unknown.group(1)}")
    place = re.search(r'at "([^"]+)"', message)
    if place:
        return _relative_path(place.group(1))
    field = re.search(r"Failed to parse (\w+) field", message)
    return field.group(1) if field else "Manifest"


def _relative_path(path: str) -> str:
    return path.removeprefix("Manifest.") or "Manifest"


class _ManifestRules:
    """Checks one manifest and collects (field path, problem) pairs, so one run reports them all."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._violations: list[tuple[str, str]] = []

    def violations(self) -> list[tuple[str, str]]:
        if self._check_schema_version():
            self._check_identity()
            self._check_sizes()
            self._check_special_tokens()
            self._check_tokenizers()
            self._check_graphs()
            self._check_checksums()
            self._check_parity()
        return self._violations

    def _fail(self, field: str, problem: str) -> None:
        self._violations.append((field, problem))

    def _check_schema_version(self) -> bool:
        version = self.manifest.schema_version
        if version == 0:
            self._fail("schema_version", "missing")
        elif version not in SUPPORTED_SCHEMA_VERSIONS:
            known = ", ".join(map(str, sorted(SUPPORTED_SCHEMA_VERSIONS)))
            self._fail("schema_version", f"{version} is not supported; this reader knows {known}")
        else:
            return True
        return False

    def _check_identity(self) -> None:
        manifest = self.manifest
        try:
            validate_name(manifest.name)
        except ValueError as error:
            self._fail("name", str(error))
        if manifest.version < 1:
            self._fail("version", f"must be a positive integer, got {manifest.version}")
        if manifest.kind not in GRAPH_ROLES_BY_KIND:
            self._fail("kind", f"must be one of {_listing(ModelKind.Name(k) for k in GRAPH_ROLES_BY_KIND)}")
        if manifest.cell not in CELLS:
            self._fail("cell", f"{manifest.cell!r} is not one of {_listing(CELLS)}")
        if manifest.opset < 1:
            self._fail("opset", f"must be a positive ONNX opset, got {manifest.opset}")

    @property
    def _is_seq2seq(self) -> bool:
        return self.manifest.kind == ModelKind.MODEL_KIND_SEQ2SEQ

    def _check_sizes(self) -> None:
        sizes = self.manifest.sizes
        required = ["embedding_size", "hidden_size", "num_layers", "vocab_size"]
        if self._is_seq2seq:
            required += ["source_vocab_size", "encoder_hidden_size", "encoder_layers"]
        for field in required:
            if getattr(sizes, field) < 1:
                self._fail(f"sizes.{field}", f"must be positive, got {getattr(sizes, field)}")
        if sizes.attention not in ATTENTIONS:
            self._fail("sizes.attention", f"{sizes.attention!r} is not one of {_listing(ATTENTIONS)}")
        elif sizes.attention and not self._is_seq2seq:
            self._fail("sizes.attention", f"a language model has no attention, got {sizes.attention!r}")

    def _check_special_tokens(self) -> None:
        special = self.manifest.special_tokens
        vocab_sizes = [self.manifest.sizes.vocab_size]
        if self._is_seq2seq:
            vocab_sizes.append(self.manifest.sizes.source_vocab_size)
        smallest_vocab = min(vocab_sizes)
        ids = {field: getattr(special, field) for field in ("pad_id", "bos_id", "eos_id", "unk_id")}
        for field, token_id in ids.items():
            if smallest_vocab > 0 and not 0 <= token_id < smallest_vocab:
                self._fail(
                    f"special_tokens.{field}", f"{token_id} is outside the vocabulary [0, {smallest_vocab})"
                )
        for token_id, count in Counter(ids.values()).items():
            if count > 1:
                sharing = [field for field, value in ids.items() if value == token_id]
                self._fail("special_tokens", f"{_listing(sharing)} share the id {token_id}")

    def _check_tokenizers(self) -> None:
        expected = TOKENIZER_ROLES_BY_KIND.get(self.manifest.kind)
        if expected is None:
            return  # the kind is already reported; which tokenizers it needs is unknown
        tokenizers = self.manifest.tokenizers
        for role in expected:
            if role not in tokenizers:
                self._fail(f'tokenizers["{role}"]', f"missing; this kind needs {_listing(expected)}")
        for role, file_name in sorted(tokenizers.items()):
            if role not in expected:
                self._fail(f'tokenizers["{role}"]', f"unknown role; this kind has {_listing(expected)}")
            if not is_valid_file_name(file_name):
                self._fail(f'tokenizers["{role}"]', f"{file_name!r} is not a plain file name")

    def _check_graphs(self) -> None:
        graphs = self.manifest.graphs
        roles = GRAPH_ROLES_BY_KIND.get(self.manifest.kind)
        allowed = None if roles is None else (*roles, *OPTIONAL_GRAPH_ROLES_BY_KIND[self.manifest.kind])
        if not graphs:
            self._fail("graphs", "a bundle needs at least one graph")
        seen_files: set[str] = set()
        roles_by_variant: dict[str, set[str]] = {}
        for index, graph in enumerate(graphs):
            where = f"graphs[{index}]"
            if allowed is not None and graph.role not in allowed:
                self._fail(f"{where}.role", f"{graph.role!r} is not one of {_listing(allowed)} for this kind")
            if graph.variant not in VARIANTS:
                self._fail(f"{where}.variant", f"{graph.variant!r} is not one of {_listing(VARIANTS)}")
            if not is_valid_file_name(graph.file):
                self._fail(f"{where}.file", f"{graph.file!r} is not a plain file name")
            elif graph.file in seen_files:
                self._fail(f"{where}.file", f"{graph.file!r} is used by another graph")
            seen_files.add(graph.file)
            variant_roles = roles_by_variant.setdefault(graph.variant, set())
            if graph.role in variant_roles:
                self._fail(where, f"a second {graph.role!r} graph for variant {graph.variant!r}")
            variant_roles.add(graph.role)
            self._check_graph_interface(where, graph)
        if roles is not None:
            for variant, present in sorted(roles_by_variant.items()):
                for role in roles:
                    if role not in present:
                        self._fail("graphs", f"variant {variant!r} has no {role!r} graph")
        self._check_prefill_matches_step()

    def _check_prefill_matches_step(self) -> None:
        """An LM's prefill graph is fed exactly what its variant's step is fed and returns step's state."""
        steps = {g.variant: g for g in self.manifest.graphs if g.role == "step"}
        for index, graph in enumerate(self.manifest.graphs):
            step = steps.get(graph.variant)
            if graph.role != "prefill" or step is None:
                continue
            if list(graph.inputs) != list(step.inputs) or list(graph.state_inputs) != list(step.state_inputs):
                self._fail(f"graphs[{index}].inputs", f"differ from the {graph.variant!r} step graph's")
            step_outputs = {t.name: t for t in step.outputs}
            expected = [step_outputs.get(name) for name in step.state_outputs]
            outputs = list(graph.outputs)
            if list(graph.state_outputs) != list(step.state_outputs) or outputs[: len(expected)] != expected:
                self._fail(f"graphs[{index}].outputs",
                           f"must be the {graph.variant!r} step graph's state outputs, then optionally "
                           f"{LAST_LOG_PROBS}")
                continue
            log_probs = step_outputs.get("log_probs")
            last = [TensorSpec(name=LAST_LOG_PROBS, dtype=log_probs.dtype,
                               shape=[log_probs.shape[0], log_probs.shape[-1]])] if log_probs is not None else []
            if outputs[len(expected):] not in ([], last):
                self._fail(f"graphs[{index}].outputs[{len(expected)}]",
                           f"after the state outputs a prefill graph has only {LAST_LOG_PROBS} "
                           f"{last[0].dtype if last else 'float32'}[batch, vocab], the step's last log-probs")

    def _check_graph_interface(self, where: str, graph: Graph) -> None:
        if not graph.inputs:
            self._fail(f"{where}.inputs", "a graph has at least one input")
        if not graph.outputs:
            self._fail(f"{where}.outputs", "a graph has at least one output")
        inputs = self._check_tensor_specs(f"{where}.inputs", graph.inputs)
        outputs = self._check_tensor_specs(f"{where}.outputs", graph.outputs)
        self._check_state_names(f"{where}.state_inputs", graph.state_inputs, inputs, "input")
        self._check_state_names(f"{where}.state_outputs", graph.state_outputs, outputs, "output")
        if graph.role == "encoder" and graph.state_inputs:
            self._fail(f"{where}.state_inputs", "the encoder takes no state")
        if graph.role in RECURRENT_ROLES:
            if not graph.state_inputs:
                self._fail(f"{where}.state_inputs", f"a {graph.role!r} graph carries recurrent state")
            if len(graph.state_inputs) != len(graph.state_outputs):
                self._fail(
                    f"{where}.state_outputs",
                    f"{len(graph.state_outputs)} state outputs for {len(graph.state_inputs)} state inputs",
                )
            # Pairs up to the shorter list; a length difference is reported just above.
            pairs = zip(graph.state_inputs, graph.state_outputs, strict=False)
            for position, (name_in, name_out) in enumerate(pairs):
                spec_in, spec_out = inputs.get(name_in), outputs.get(name_out)
                if spec_in is None or spec_out is None:
                    continue  # already reported
                if spec_in.dtype != spec_out.dtype or len(spec_in.shape) != len(spec_out.shape):
                    self._fail(
                        f"{where}.state_outputs[{position}]",
                        f"{name_out!r} ({_describe(spec_out)}) does not match "
                        f"{name_in!r} ({_describe(spec_in)})",
                    )

    def _check_tensor_specs(self, where: str, specs) -> dict[str, TensorSpec]:
        by_name: dict[str, TensorSpec] = {}
        for index, spec in enumerate(specs):
            if not spec.name:
                self._fail(f"{where}[{index}].name", "empty")
            elif spec.name in by_name:
                self._fail(f"{where}[{index}].name", f"{spec.name!r} appears twice")
            by_name[spec.name] = spec
            if spec.dtype not in DTYPES:
                self._fail(f"{where}[{index}].dtype", f"{spec.dtype!r} is not one of {_listing(DTYPES)}")
            for axis, dim in enumerate(spec.shape):
                is_fixed = dim.isascii() and dim.isdigit() and int(dim) > 0 and dim == str(int(dim))
                if not (is_fixed or _SYMBOLIC_DIM.fullmatch(dim)):
                    self._fail(
                        f"{where}[{index}].shape[{axis}]",
                        f"{dim!r} is neither a positive integer nor a symbolic name",
                    )
        return by_name

    def _check_state_names(self, where: str, names, specs: dict[str, TensorSpec], direction: str) -> None:
        for index, name in enumerate(names):
            if name not in specs:
                self._fail(f"{where}[{index}]", f"{name!r} is not an {direction} of the graph")
        for name, count in Counter(names).items():
            if count > 1:
                self._fail(where, f"{name!r} appears {count} times")

    def _check_checksums(self) -> None:
        manifest = self.manifest
        needed = {graph.file for graph in manifest.graphs} | set(manifest.tokenizers.values())
        for file_name in sorted(needed - set(manifest.sha256)):
            if is_valid_file_name(file_name):
                self._fail("sha256", f"no checksum for {file_name!r}")
        for file_name, digest in sorted(manifest.sha256.items()):
            if not is_valid_file_name(file_name):
                self._fail(f'sha256["{file_name}"]', "not a plain file name of the bundle")
            if not _SHA256_HEX.fullmatch(digest):
                self._fail(f'sha256["{file_name}"]', f"{digest!r} is not 64 lowercase hex digits")

    def _check_parity(self) -> None:
        seen: set[str] = set()
        for index, report in enumerate(self.manifest.parity):
            if report.variant not in VARIANTS:
                self._fail(
                    f"parity[{index}].variant", f"{report.variant!r} is not one of {_listing(VARIANTS)}"
                )
            elif report.variant in seen:
                self._fail(f"parity[{index}].variant", f"a second report for {report.variant!r}")
            seen.add(report.variant)


def _listing(values) -> str:
    return ", ".join(repr(value) if isinstance(value, str) else str(value) for value in values)


def _describe(spec: TensorSpec) -> str:
    return f"{spec.dtype} [{', '.join(spec.shape)}]"
