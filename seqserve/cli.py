"""The `seqserve` console script: one entry point that hands each command to its part.

Imports are lazy so `seqserve serve` never loads torch and `seqserve train` never loads grpc.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "train": ("training.cli", "train_main", "train an LM or seq2seq model"),
    "eval": ("training.cli", "eval_main", "evaluate a run (perplexity, BLEU/chrF, WER/PER)"),
    "data": ("training.data.cli", "main", "build the built-in corpora"),
    "export": ("exporters.cli", "export_main", "export a run to a parity-checked ONNX bundle"),
    "inspect": ("exporters.cli", "inspect_main", "print a bundle's manifest and verify checksums"),
    "serve": ("server.cli", "serve_main", "run the gRPC server and /metrics"),
    "client": ("server.client", "main", "call a running server"),
    "bench": ("bench.cli", "main", "benchmarks"),
}


def usage() -> str:
    lines = ["usage: seqserve COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"seqserve: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    import importlib

    func = getattr(importlib.import_module(module_name), func_name)
    return func(rest) or 0


if __name__ == "__main__":
    raise SystemExit(main())
