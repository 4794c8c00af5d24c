"""German -> English pairs from the Ding dictionary (Debian package `trans-de-en`).

Source format, one entry per line (`#` lines are comments):

    Aalreuse {f}; Aalkorb {m} | Aalreusen {pl}; Aalkörbe {pl} :: eel trap; weel [archaic] | eel traps; weels

The two sides are split on ` :: `; each side's ` | ` alternatives are aligned one to one (a headword,
its plural, then example phrases); within an alternative, `; ` separates synonyms that are *not*
aligned between the sides. Choices made here:

- Synonyms are paired as a star around the first (primary) variant of each side: the first German
  variant with every English variant, and every German variant with the first English variant.
  Every synonym is seen once, the pair count grows linearly (a cross-product grows quadratically and
  pairs rare synonyms with each other), and every pair contains at least one primary term.
- Annotations are removed with their content: `{f}`/`{pl}`/`{vt}` (grammar), `[ugs.]`/`[Br.]` (register,
  region, domain), `<...>` (search spellings), `(...)` (glosses such as "(zoologische Familie)" and
  optional words such as "(chemischer) Abbau"; they rarely correspond between the sides, so keeping
  their words would teach the model to invent or drop glosses), `/IFP/` (abbreviations) and
  `~Word` (see-also references, to the end of the variant).
- Whitespace is collapsed, a variant that is empty or still holds a stray bracket after cleaning is
  dropped, a pair with a side longer than 200 characters is dropped, and exact duplicate pairs are
  written once.
- The split groups identical German sources, so all translations of a source are in one split (the
  test set keeps every reference).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from training.data import SPLIT_NAMES, CorpusNotInstalledError, split_by_group
from training.data.files import write_pairs

DING_PATH = Path("/usr/share/trans/de-en")
MAX_CHARS = 200

SIDE_SEPARATOR = " :: "
# Split on the bare characters: the spaces around them are collapsed with the rest of the whitespace.
ALTERNATIVE_SEPARATOR = "|"
SYNONYM_SEPARATOR = ";"

# Annotations are removed from a whole side before it is split, so a `;` inside one ("/bu.; bsh./")
# never splits a synonym; none may cross a `|`, so an unbalanced bracket cannot eat an alternative.
_ANNOTATION = re.compile(
    r"\{[^{}|]*\}"  # {f} {pl} {vt}
    r"|\[[^\[\]|]*\]"  # [ugs.] [Br.] [zool.]
    r"|<[^<>|]*>"  # <alternative spellings>
    r"|\([^()|]*\)"  # (glosses), (optional) words
    r"|(?<!\S)/[^\s/|][^/|]*/(?=[\s;,]|$)"  # /abbreviations/
    r"|(?<!\S)~[^;|]*"  # ~see-also references, to the end of the variant
)
# "wind-up [Br.]/windup [Am.]": regional spellings joined by a slash; keep them "wind-up/windup" like
# the dictionary's other slash alternatives ("stellen/einbringen"), not "wind-up /windup".
_ANNOTATION_BEFORE_SLASH = re.compile(r"\s*\[[^\[\]|]*\]/\s*")
_STRAY_BRACKETS = re.compile(r"[{}\[\]<>()]")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,.;:!?…])")
_C1_CONTROLS = re.compile(r"[\x80-\x9f]")


def _fix_encoding(text: str) -> str:
    """NFC-normalise, and read the few stray C1 control characters as the cp1252 bytes they were."""
    text = _C1_CONTROLS.sub(lambda m: bytes([ord(m.group())]).decode("cp1252", errors="replace"), text)
    return unicodedata.normalize("NFC", text)


def remove_annotations(side: str) -> str:
    """Remove every annotation (with its content) from one side of an entry; separators are kept."""
    side = _ANNOTATION_BEFORE_SLASH.sub("/", side)
    while True:  # parentheses nest, "(a (b) c)": each pass removes the innermost level
        cleaned = _ANNOTATION.sub(" ", side)
        if cleaned == side:
            return side
        side = cleaned


def clean_variant(variant: str) -> str:
    """Collapse whitespace of one (already annotation-free) variant; "" if it is empty or malformed."""
    variant = " ".join(variant.split())
    variant = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", variant)
    variant = variant.strip(" ,;")
    if _STRAY_BRACKETS.search(variant):
        return ""
    return variant


def _variants(alternative: str) -> list[str]:
    variants = (clean_variant(v) for v in alternative.split(SYNONYM_SEPARATOR))
    return [v for v in variants if v]


def entry_pairs(line: str) -> list[tuple[str, str]]:
    """All (German, English) pairs of one dictionary line; [] for comments and malformed lines."""
    line = _fix_encoding(line.strip())
    if not line or line.startswith("#"):
        return []
    sides = line.split(SIDE_SEPARATOR)
    if len(sides) != 2:
        return []
    german_alternatives = remove_annotations(sides[0]).split(ALTERNATIVE_SEPARATOR)
    english_alternatives = remove_annotations(sides[1]).split(ALTERNATIVE_SEPARATOR)
    if len(german_alternatives) != len(english_alternatives):
        return []  # the alignment is unknown, so any pairing would be a guess
    pairs = []
    for german_alternative, english_alternative in zip(
        german_alternatives, english_alternatives, strict=True
    ):
        german, english = _variants(german_alternative), _variants(english_alternative)
        if not german or not english:
            continue
        pairs.extend((german[0], e) for e in english)
        pairs.extend((g, english[0]) for g in german[1:])
    return pairs


def read_ding(path: str | Path = DING_PATH) -> list[tuple[str, str]]:
    """All cleaned pairs of the dictionary file, deduplicated and sorted."""
    path = Path(path)
    if not path.is_file():
        raise CorpusNotInstalledError(
            f"the Ding German-English dictionary was not found at {path}: "
            "install it with `sudo apt-get install trans-de-en`"
        )
    pairs = set()
    with path.open(encoding="utf-8", errors="replace") as file:
        for line in file:
            for german, english in entry_pairs(line):
                if len(german) <= MAX_CHARS and len(english) <= MAX_CHARS:
                    pairs.add((german, english))
    return sorted(pairs)


def build_ding(
    out_dir: str | Path,
    seed: int = 1,
    valid_frac: float = 0.05,
    test_frac: float = 0.05,
    source_path: str | Path = DING_PATH,
) -> dict[str, dict[str, int]]:
    """Write train.tsv, valid.tsv and test.tsv (German<TAB>English) under out_dir.

    Returns, per split, the number of distinct German sources and of pairs written.
    """
    pairs = read_ding(source_path)
    splits = split_by_group(pairs, lambda pair: pair[0], seed, valid_frac, test_frac)
    out_dir = Path(out_dir)
    counts = {}
    for name in SPLIT_NAMES:
        write_pairs(out_dir / f"{name}.tsv", splits[name])
        counts[name] = {"sources": len({german for german, _ in splits[name]}), "pairs": len(splits[name])}
    return counts
