"""A bundle's tokenizers, opened and checked against its manifest (the special ids, the vocabulary size).

Apart from the ONNX Runtime sessions (`loader.py`), so that API processes, which tokenize and detokenize
but run no graph, read a bundle's tokenizers the same way the engine does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from tokenizers import Tokenizer

from seqserve.bundle.errors import BundleError
from seqserve.v1.manifest_pb2 import Manifest

# The special tokens every seqserve tokenizer carries (docs/architecture.md), by manifest field.
_SPECIAL_TOKENS = {"pad_id": "<pad>", "bos_id": "<bos>", "eos_id": "<eos>", "unk_id": "<unk>"}


class DescribedBundle:
    """What a bundle's every view has (the engine's `LoadedBundle`, an API process's `BundleView`): the
    manifest's name and version, and the tokenizers by role."""

    manifest: Manifest
    tokenizers: Mapping[str, Tokenizer]

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    def tokenizer(self, role: str) -> Tokenizer:
        """The tokenizer of `role`; BundleError if this kind has none."""
        try:
            return self.tokenizers[role]
        except KeyError:
            raise BundleError(
                f"bundle {self.name} v{self.version} has no {role!r} tokenizer; it has {', '.join(self.tokenizers)}"
            ) from None


def open_tokenizers(bundle_dir: Path, manifest: Manifest) -> dict[str, Tokenizer]:
    """Every tokenizer of the bundle, by role; BundleError naming the file if one does not fit."""
    return {role: open_tokenizer(bundle_dir, manifest, role, file_name)
            for role, file_name in sorted(manifest.tokenizers.items())}


def open_tokenizer(bundle_dir: Path, manifest: Manifest, role: str, file_name: str) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(str(bundle_dir / file_name))
    except Exception as error:  # tokenizers raises a bare Exception for unreadable files
        raise BundleError(f"bundle {bundle_dir}: tokenizer {file_name} cannot be loaded: {error}") from error
    # Training encoded "<eos>" typed in text as plain characters; the flag is not saved in the file.
    tokenizer.encode_special_tokens = True
    problems = []
    for field, token in _SPECIAL_TOKENS.items():
        expected_id = getattr(manifest.special_tokens, field)
        actual_id = tokenizer.token_to_id(token)
        if actual_id is None:
            problems.append(f"has no {token} token")
        elif actual_id != expected_id:
            problems.append(
                f"has {token} at id {actual_id}, the manifest's special_tokens.{field} is {expected_id}"
            )
    # The model's vocabulary may be padded beyond the tokenizer's, never the other way round.
    model_vocab = manifest.sizes.source_vocab_size if role == "source" else manifest.sizes.vocab_size
    tokenizer_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if tokenizer_vocab > model_vocab:
        problems.append(f"has {tokenizer_vocab} tokens, more than the model's vocabulary of {model_vocab}")
    if problems:
        raise BundleError(f"bundle {bundle_dir}: tokenizer {file_name} ({role}) " + "; ".join(problems))
    return tokenizer
