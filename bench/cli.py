"""`seqserve bench serve|ceiling|prefix|priorities|quality ...`: the serving sweep against the baselines, the
message path's ceiling with a model that costs nothing, the prefix cache and priorities, and model quality
through the server per numeric variant. Each subcommand's `--help` lists its options.
"""

from __future__ import annotations

import sys

SUBCOMMANDS = {
    "serve": ("bench.serve", "throughput and latency sweep: seqserve vs PyTorch, ONNX Runtime per request, "
                             "the message path and the GEMM ceiling"),
    "ceiling": ("bench.ceiling", "the wire's ceiling: a model that costs nothing at 256-4,096 streams, "
                                 "beside the null server and an older tree"),
    "prefix": ("bench.prefix", "the prefix cache off against on: prefill work and TTFT"),
    "priorities": ("bench.priorities", "TTFT per priority class under a full batch"),
    "quality": ("bench.quality", "G2P WER/PER and LM bits per character through the server, fp32/fp16/int8, "
                                 "beside published anchors"),
}


def usage() -> str:
    lines = ["usage: seqserve bench SUBCOMMAND [ARGS...]", "", "subcommands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in SUBCOMMANDS:
        print(f"seqserve bench: unknown subcommand {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
