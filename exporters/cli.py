"""`seqserve export RUN --repository DIR --name NAME` and `seqserve inspect BUNDLE`.

`inspect` needs only the bundle layer (no torch), so it is quick and works where only the server is
installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from exporters import ExportError


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqserve export",
        description="Export a training run to a parity-checked ONNX bundle in a model repository. "
                    "Nothing is published unless ONNX Runtime matches PyTorch.")
    parser.add_argument("run", help="run directory (uses best.pt, else last.pt) or a checkpoint file")
    parser.add_argument("--repository", required=True, help="model repository directory (created if missing)")
    parser.add_argument("--name", required=True, help="model name, [a-z0-9][a-z0-9._-]*")
    parser.add_argument("--version", type=_positive, help="version to publish (default: latest + 1)")
    parser.add_argument("--variants", default="", help="extra numeric variants besides fp32: fp16,int8")
    parser.add_argument("--eval-limit", type=_non_negative, default=100,
                        help="valid documents/sources measured for metrics.json (0 = all; default 100)")
    parser.add_argument("--greedy-inputs", type=_positive, default=200,
                        help="inputs decoded greedily by both PyTorch and ONNX Runtime (default 200)")
    parser.add_argument("--beam-inputs", type=_positive, default=200,
                        help="inputs decoded by beam search by both (default 200)")
    parser.add_argument("--beam-size", type=_positive, default=5)
    parser.add_argument("--max-new-tokens", type=_positive, default=50,
                        help="decoding length in the parity check (default 50)")
    parser.add_argument("--max-abs-diff", type=float, default=1e-4,
                        help="fp32 parity limit on log-probs and states (default 1e-4; recorded in the manifest)")
    parser.add_argument("--providers", default="CPUExecutionProvider",
                        help="ONNX Runtime providers for the parity check, in order (comma-separated)")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON when done")
    return parser


def export_main(argv: list[str]) -> int:
    args = export_parser().parse_args(argv)
    from seqserve.bundle import validate_name

    try:
        # Checked before anything heavy is loaded, so a typo costs nothing.
        validate_name(args.name)
        from exporters.variants import parse_variants

        variants = tuple(parse_variants(args.variants))
    except ValueError as error:
        print(f"seqserve export: {error}", file=sys.stderr)
        return 2

    from exporters.bundle import ExportOptions, export_run
    from exporters.parity import ParitySettings, Thresholds
    from seqserve.bundle import BundleError
    from seqserve.bundle.manifest import manifest_to_json

    options = ExportOptions(
        variants=variants, eval_limit=args.eval_limit,
        thresholds=Thresholds(max_abs_diff_log_probs=args.max_abs_diff, max_abs_diff_state=args.max_abs_diff),
        providers=tuple(p.strip() for p in args.providers.split(",") if p.strip()),
        parity=ParitySettings(greedy_inputs=args.greedy_inputs, beam_inputs=args.beam_inputs,
                              beam_size=args.beam_size, max_new_tokens=args.max_new_tokens))
    try:
        result = export_run(args.run, args.repository, args.name, args.version, options,
                            progress=lambda line: print(f"export: {line}", file=sys.stderr, flush=True))
    except (ExportError, BundleError, FileNotFoundError, ValueError) as error:
        print(f"seqserve export: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(manifest_to_json(result.manifest), end="")
    else:
        print(f"published {result.path}")
        print("\n".join(summary_lines(result.manifest)))
        print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in result.seconds.items()))
    return 0


def inspect_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="seqserve inspect", description="Print a bundle's manifest summary and verify its checksums.")
    parser.add_argument("bundle", help="bundle directory (REPOSITORY/NAME/VERSION)")
    parser.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    args = parser.parse_args(argv)

    from seqserve.bundle import BundleError, verify_bundle
    from seqserve.bundle.manifest import MANIFEST_FILE, manifest_to_json

    bundle = Path(args.bundle)
    try:
        manifest = verify_bundle(bundle, **_expected_identity(bundle))
    except BundleError as error:
        print(f"seqserve inspect: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(manifest_to_json(manifest), end="")
        return 0
    print(f"bundle {bundle}")
    print("\n".join(summary_lines(manifest)))
    print(f"checksums: {len(manifest.sha256)} files verified")
    unlisted = sorted(p.name for p in bundle.iterdir()
                      if p.name not in manifest.sha256 and p.name != MANIFEST_FILE)
    if unlisted:
        print(f"note: files not in the manifest (ignored by the server): {', '.join(unlisted)}")
    return 0


def _expected_identity(bundle: Path) -> dict:
    """Inside a repository (NAME/VERSION) the manifest must agree with the directories, as the server
    checks."""
    from seqserve.bundle import validate_name, validate_version

    try:
        return {"expected_version": validate_version(bundle.resolve().name),
                "expected_name": validate_name(bundle.resolve().parent.name)}
    except ValueError:
        return {}


def summary_lines(manifest) -> list[str]:
    from seqserve.bundle.spec import ModelKind

    s = manifest.sizes
    kind = ModelKind.from_pb(manifest.kind)
    lines = [f"model: {manifest.name} v{manifest.version} ({kind.value}, {manifest.cell}), "
             f"schema {manifest.schema_version}"]
    sizes = (f"sizes: embedding {s.embedding_size}, hidden {s.hidden_size} x {s.num_layers} layers, "
             f"vocab {s.vocab_size}")
    if kind is ModelKind.SEQ2SEQ:
        sizes += (f", source vocab {s.source_vocab_size}, "
                  f"encoder {s.encoder_hidden_size} x {s.encoder_layers}"
                  f"{' bidirectional' if s.bidirectional_encoder else ''}, attention {s.attention}, "
                  f"input feeding {'on' if s.input_feeding else 'off'}")
    elif s.tie_weights:
        sizes += ", tied embeddings"
    lines.append(sizes)
    t = manifest.special_tokens
    lines.append(f"special tokens: pad {t.pad_id}, bos {t.bos_id}, eos {t.eos_id}, unk {t.unk_id}; "
                 f"tokenizers: {', '.join(f'{r}={f}' for r, f in sorted(manifest.tokenizers.items()))}")
    lines.append(f"exported with opset {manifest.opset}, onnxruntime {manifest.onnxruntime_version}, "
                 f"torch {manifest.torch_version}, at {manifest.created_at.ToJsonString()}")
    lines.append("graphs:")
    for g in manifest.graphs:
        io = lambda specs: ", ".join(f"{t.name}[{','.join(t.shape)}]" for t in specs)  # noqa: E731
        lines.append(f"  {g.variant:<4} {g.role:<12} {g.file}: ({io(g.inputs)}) -> ({io(g.outputs)})")
    lines.append("parity:")
    for p in manifest.parity:
        lines.append(f"  {p.variant:<4} {'passed' if p.passed else 'FAILED'}: "
                     f"log-probs {p.max_abs_diff_log_probs:.2e}, state {p.max_abs_diff_state:.2e}, "
                     f"greedy {p.greedy_matched}/{p.greedy_checked}, "
                     f"beam {p.beam_matched}/{p.beam_checked}, on {', '.join(p.providers)}")
        if p.quality_delta:
            deltas = sorted(p.quality_delta.items())
            lines.append("       quality delta: " + ", ".join(f"{k} {v:+.4g}" for k, v in deltas))
    lines.append("metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(manifest.metrics.items())))
    return lines


if __name__ == "__main__":
    raise SystemExit(export_main(sys.argv[1:]))
