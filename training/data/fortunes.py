"""English quotations for language modelling, from the Debian `fortunes` / `fortunes-min` packages.

A fortune file is plain text with fortunes separated by lines holding only `%`; beside each sits a
binary `.dat` index and, on Debian, a `.u8` symlink to the same text: only the regular text files
are read, and the `off/` (offensive) subfolder is not. Each fortune is cleaned: overstrike sequences
such as "____\\b\\b\\b\\bLAST" resolved to what a terminal shows, doubly encoded UTF-8 repaired,
bells and other invisible controls removed, trailing spaces and surrounding blank lines dropped;
inner blank lines, indentation and tabs are kept. Exact duplicates across files are kept once, and
the split is by fortune. Output files use the `%`-separated document format of `files.py`.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from training.data import SPLIT_NAMES, CorpusNotInstalledError, split_by_group
from training.data.files import DOCUMENT_SEPARATOR, write_documents

FORTUNE_DIR = Path("/usr/share/games/fortunes")

# Files that sit beside the fortune texts but are not fortunes themselves.
_SKIPPED_SUFFIXES = (".dat", ".u8", ".gz")
# Bells (^G, the joke of a few computer fortunes) and other controls a terminal would not print;
# tabs and newlines stay.
_INVISIBLE_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# C1 controls never occur in real text: where they do, UTF-8 was decoded as Latin-1 (once or more).
_C1_CONTROLS = re.compile(r"[\x80-\x9f]")


def repair_mojibake(text: str) -> str:
    """Undo UTF-8 text that was decoded as Latin-1, possibly repeatedly ("donÃ¢Â\x80Â\x99t" -> "don’t")."""
    while _C1_CONTROLS.search(text):
        try:
            text = text.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            break  # not mojibake after all; the controls are removed with the others
    return text


def resolve_overstrike(text: str) -> str:
    """Apply backspaces the way a terminal shows them: each backspace removes the character before it.

    Old fortunes underline or embolden with "_\\bA" or "____\\b\\b\\b\\bWORD"; what is left is the word.
    """
    if "\b" not in text:
        return text
    shown: list[str] = []
    for character in text:
        if character == "\b":
            if shown and shown[-1] != "\n":
                shown.pop()
        else:
            shown.append(character)
    return "".join(shown)


def clean_fortune(text: str) -> str:
    """One fortune as a language model should see it ("" if nothing is left)."""
    text = resolve_overstrike(repair_mojibake(text.replace("\r\n", "\n")))
    text = _INVISIBLE_CONTROLS.sub("", text)
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def read_fortune_file(path: str | Path) -> list[str]:
    """The cleaned, non-empty fortunes of one fortune text file, in file order."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    fortunes = []
    current: list[str] = []
    for line in text.split("\n") + [DOCUMENT_SEPARATOR]:
        if line.rstrip("\r") == DOCUMENT_SEPARATOR:
            fortune = clean_fortune("\n".join(current))
            if fortune.strip():
                fortunes.append(fortune)
            current = []
        else:
            current.append(line)
    return fortunes


def fortune_files(fortune_dir: str | Path = FORTUNE_DIR) -> list[Path]:
    """The fortune text files in fortune_dir, sorted: regular files only, no indexes or symlinks."""
    fortune_dir = Path(fortune_dir)
    files = []
    if fortune_dir.is_dir():
        for path in sorted(fortune_dir.iterdir()):
            if path.is_file() and not path.is_symlink() and not path.name.endswith(_SKIPPED_SUFFIXES):
                files.append(path)
    if not files:
        raise CorpusNotInstalledError(
            f"no fortune files found in {fortune_dir}: install them with `sudo apt-get install fortunes` "
            "(or the smaller fortunes-min)"
        )
    return files


def read_fortunes(fortune_dir: str | Path = FORTUNE_DIR) -> list[str]:
    """Every distinct fortune of every fortune file, sorted (so the split ignores file order)."""
    fortunes = set()
    for path in fortune_files(fortune_dir):
        fortunes.update(read_fortune_file(path))
    return sorted(fortunes)


def build_fortunes(
    out_dir: str | Path,
    seed: int = 1,
    valid_frac: float = 0.05,
    test_frac: float = 0.05,
    fortune_dir: str | Path = FORTUNE_DIR,
) -> dict[str, dict[str, int]]:
    """Write train.txt, valid.txt and test.txt (`%`-separated fortunes) under out_dir.

    Returns, per split, the number of fortunes and of characters (a fortune's text, separators excluded).
    """
    fortunes = read_fortunes(fortune_dir)
    # Written in a seeded shuffled order, not sorted: a language model reading a file as one stream
    # should not see all fortunes that start with a tab, or all parts of a series, in a row.
    random.Random(seed).shuffle(fortunes)
    splits = split_by_group(fortunes, lambda fortune: fortune, seed, valid_frac, test_frac)
    out_dir = Path(out_dir)
    counts = {}
    for name in SPLIT_NAMES:
        write_documents(out_dir / f"{name}.txt", splits[name])
        counts[name] = {"fortunes": len(splits[name]), "characters": sum(map(len, splits[name]))}
    return counts
