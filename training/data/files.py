"""The two corpus file formats seqserve trains from: TSV pair files and plain-text document files.

Pairs (seq2seq): one `source<TAB>target` per line, UTF-8. A source may appear on several lines, one per
reference target (cmudict words with several pronunciations).

Documents (language models): documents separated by lines holding only `%` (the fortune-file format,
which lets a document contain blank lines). A file with no `%` line is read one document per non-empty
line, so any plain text file works as a corpus as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

DOCUMENT_SEPARATOR = "%"


class CorpusFormatError(ValueError):
    """A corpus file does not follow its format; the message names file and line."""


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Read `source<TAB>target` lines; empty lines are skipped, anything else malformed is an error."""
    path = Path(path)
    pairs = []
    with path.open(encoding="utf-8", newline="") as file:
        for line_number, line in enumerate(file, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise CorpusFormatError(
                    f"{path}:{line_number}: expected 'source<TAB>target' (2 tab-separated fields), "
                    f"got {len(fields)} field(s): {line[:80]!r}"
                )
            source, target = fields
            if not source.strip() or not target.strip():
                raise CorpusFormatError(f"{path}:{line_number}: empty source or target: {line[:80]!r}")
            pairs.append((source, target))
    return pairs


def write_pairs(path: str | Path, pairs: Iterable[tuple[str, str]]) -> int:
    """Write pairs as TSV (creating parent folders); returns the number written.

    Refuses tabs and line breaks inside a field, since they could not be read back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8", newline="\n") as file:
        for source, target in pairs:
            for field in (source, target):
                if "\t" in field or "\n" in field or "\r" in field or not field.strip():
                    raise CorpusFormatError(
                        f"cannot write pair {(source, target)!r} to {path}: fields must be non-empty "
                        "and hold no tab or line break"
                    )
            file.write(f"{source}\t{target}\n")
            count += 1
    return count


def read_documents(path: str | Path) -> list[str]:
    """Read documents: `%`-separated if the file has any `%` line, else one per non-empty line.

    In the `%` format, leading and trailing blank lines of each document are dropped and empty
    documents are skipped; the lines inside a document are kept exactly.
    """
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as file:
        lines = [line.rstrip("\r\n") for line in file]
    if DOCUMENT_SEPARATOR not in lines:
        return [line for line in lines if line.strip()]
    documents = []
    current: list[str] = []
    for line in lines + [DOCUMENT_SEPARATOR]:
        if line == DOCUMENT_SEPARATOR:
            document = "\n".join(current).strip("\n")
            if document.strip():
                documents.append(document)
            current = []
        else:
            current.append(line)
    return documents


def write_documents(path: str | Path, documents: Iterable[str]) -> int:
    """Write documents in the `%`-separated format (creating parent folders); returns the number written.

    Refuses an empty document or one containing a line that is only `%`, since either would read back
    differently.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8", newline="\n") as file:
        for document in documents:
            if not document.strip() or DOCUMENT_SEPARATOR in document.split("\n") or "\r" in document:
                raise CorpusFormatError(
                    f"cannot write document {document[:80]!r} to {path}: it must be non-empty, hold no "
                    "carriage return and no line that is only '%'"
                )
            document = document.strip("\n")
            file.write(f"{document}\n{DOCUMENT_SEPARATOR}\n")
            count += 1
    return count
