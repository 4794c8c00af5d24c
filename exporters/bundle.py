"""A training run -> a published bundle: export, parity, variants, metrics and manifest are written into
a hidden staging directory of the repository, verified with the server's own loader, fsynced, and only
then renamed to NAME/VERSION, so a repository never holds a partial or unchecked bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime
import torch
from google.protobuf.timestamp_pb2 import Timestamp

from exporters import ExportError
from exporters.onnx_graphs import OPSET, check_recurrent_ops, export_graphs
from exporters.parity import (
    FP32_THRESHOLDS,
    ParitySettings,
    Thresholds,
    check_parity,
    open_ort_model,
    parity_failures,
    real_sequences,
)
from exporters.variants import VARIANT_THRESHOLDS, evaluation_figures, make_variant_graphs, quality_delta
from seqserve.bundle import (
    MANIFEST_FILE,
    bundle_path,
    scan_repository,
    sha256_file,
    validate_name,
    validate_version,
    write_manifest,
)
from seqserve.bundle.repository import STAGING_PREFIX
from seqserve.bundle.spec import ModelKind
from seqserve.v1.manifest_pb2 import Manifest, ModelSizes, SpecialTokens
from server.bundle.loader import load_bundle  # the one arrow into the server: its loader judges a new bundle
from training.tokenizer import special_ids

SCHEMA_VERSION = 1
METRICS_FILE = "metrics.json"
TOKENIZER_FILES = {"text": "tokenizer.json", "source": "source_tokenizer.json",
                   "target": "target_tokenizer.json"}


@dataclass(frozen=True)
class ExportOptions:
    variants: tuple[str, ...] = ()  # besides fp32: "fp16", "int8"
    eval_limit: int = 100  # valid documents (LM) or sources (seq2seq) for metrics.json; 0 = all
    real_inputs: int = 1000  # texts sampled from the run's test (or valid) split for parity inputs
    parity: ParitySettings = ParitySettings()
    thresholds: Thresholds = FP32_THRESHOLDS
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # what the parity check runs on


@dataclass
class ExportResult:
    path: Path
    manifest: Manifest
    seconds: dict[str, float] = field(default_factory=dict)  # by stage, and "total"


def next_version(repository: str | Path, name: str) -> int:
    """One more than the highest published version of `name` (1 for a new model)."""
    if not Path(repository).is_dir():
        return 1
    return max(scan_repository(repository).get(name, {}), default=0) + 1


def export_run(run: str | Path, repository: str | Path, name: str, version: int | None = None,
               options: ExportOptions = ExportOptions(), progress: Callable[[str], None] = lambda _: None
               ) -> ExportResult:
    """Export the run's best checkpoint as NAME/VERSION of `repository`; ExportError if it must not ship."""
    from training.checkpoint import (
        config_from_checkpoint,
        find_checkpoint,
        load_checkpoint,
        model_from_checkpoint,
        tokenizers_from_checkpoint,
    )

    validate_name(name)
    repository = Path(repository)
    version = validate_version(version) if version is not None else next_version(repository, name)
    target = bundle_path(repository, name, version)
    if target.exists():
        raise ExportError(f"{target} already exists; versions are never overwritten (pick another --version)")
    checkpoint = find_checkpoint(run)
    payload = load_checkpoint(checkpoint)
    cfg = config_from_checkpoint(payload)
    tokenizers = tokenizers_from_checkpoint(payload)
    # Everything that can be found wanting without exporting is checked before anything is written.
    source = _Source(run=Path(run), checkpoint=checkpoint, payload=payload, model=model_from_checkpoint(payload),
                     tokenizers=tokenizers, special_tokens=special_tokens(tokenizers), config=cfg,
                     parity_file=_split_file(cfg, ("test", "valid")), eval_file=_split_file(cfg, ("valid", "test")))
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{name}-{version}-", dir=repository))
    try:
        result = _build(source, staging, name, version, options, progress)
        started = time.perf_counter()
        publish(staging, target)
        publishing = time.perf_counter() - started
        total = result.seconds.pop("total")
        result.seconds.update(publish=publishing, total=total + publishing)
        result.path = target
        return result
    finally:
        # After a successful publish the staging directory no longer exists; after a failure it goes.
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class _Source:
    run: Path
    checkpoint: Path
    payload: dict
    model: torch.nn.Module
    tokenizers: dict
    special_tokens: SpecialTokens
    config: object
    parity_file: Path  # real inputs for the parity check: the test split, else valid
    eval_file: Path  # metrics.json: the valid split, else test


class _Stopwatch:
    """Seconds per stage, for the export's report."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage], self.last = now - self.last, now

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": time.perf_counter() - self.started}


def _build(src: _Source, staging: Path, name: str, version: int, options: ExportOptions,
           progress: Callable[[str], None]) -> ExportResult:
    """Graphs, parity reports, tokenizers, metrics.json and manifest.json in `staging`, checked."""
    model, cfg, kind = src.model, src.config, src.model.kind
    clock = _Stopwatch()
    progress(f"exporting {kind} ({model.args.cell}) from {src.checkpoint}")
    graphs = export_graphs(model, staging)
    for graph in graphs:
        check_recurrent_ops(staging / graph.file, model.args.cell, model.args.num_layers)
    clock.lap("export")

    real = real_sequences(kind, _texts(kind, src.parity_file), src.tokenizers, options.real_inputs,
                          options.parity.seed)
    progress(f"parity fp32: {len(real)} real inputs from {src.parity_file}, providers "
             f"{', '.join(options.providers)}")
    reports = [check_parity(model, open_ort_model(staging, graphs, options.providers), real,
                            variant="fp32", thresholds=options.thresholds, settings=options.parity)]
    _refuse_on_failure(reports[0])
    clock.lap("parity_fp32")

    eval_file = src.eval_file
    progress(f"metrics on {eval_file} (limit {options.eval_limit or 'none'})")
    figures = evaluation_figures(model, src.tokenizers, kind, cfg.task, eval_file, options.eval_limit)
    clock.lap("metrics")

    variant_figures = {}
    for variant in options.variants:
        progress(f"variant {variant}")
        variant_graphs = make_variant_graphs(staging, [g for g in graphs if g.variant == "fp32"], variant)
        for graph in variant_graphs:
            check_recurrent_ops(staging / graph.file, model.args.cell, model.args.num_layers)
        ort_model = open_ort_model(staging, variant_graphs, options.providers)
        report = check_parity(model, ort_model, real, variant=variant, thresholds=VARIANT_THRESHOLDS[variant],
                              settings=options.parity)
        variant_figures[variant] = evaluation_figures(ort_model, src.tokenizers, kind, cfg.task, eval_file,
                                                      options.eval_limit)
        report.quality_delta.update(quality_delta(variant_figures[variant], figures))
        _refuse_on_failure(report)
        reports.append(report)
        graphs += variant_graphs
        clock.lap(f"variant_{variant}")

    tokenizer_files = {}
    for role, text in sorted(src.payload["tokenizers"].items()):
        tokenizer_files[role] = TOKENIZER_FILES[role]
        (staging / TOKENIZER_FILES[role]).write_text(text, encoding="utf-8")
    metrics = {"split_file": str(eval_file), "eval_limit": options.eval_limit, "measured_with": "pytorch",
               **figures, "variants": variant_figures}
    (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n",
                                        encoding="utf-8")

    manifest = Manifest(
        schema_version=SCHEMA_VERSION, name=name, version=version, kind=ModelKind(kind).to_pb(), cell=model.args.cell,
        sizes=model_sizes(model), special_tokens=src.special_tokens, tokenizers=tokenizer_files,
        graphs=graphs, opset=OPSET, onnxruntime_version=onnxruntime.__version__,
        torch_version=torch.__version__, parity=reports,
        metrics={k: float(v) for k, v in figures.items() if isinstance(v, (int, float))},
        training=provenance(src),
    )
    manifest.created_at.CopyFrom(_now())
    manifest.sha256.update({p.name: sha256_file(p) for p in sorted(staging.iterdir())
                            if p.name != MANIFEST_FILE})
    write_manifest(manifest, staging / MANIFEST_FILE)
    # The server's loader is the judge of a bundle: if it cannot open every variant, nothing ships.
    for variant in ("fp32", *options.variants):
        load_bundle(staging, variant=variant)
    clock.lap("manifest")
    return ExportResult(path=staging, manifest=manifest, seconds=clock.total())


def _refuse_on_failure(report) -> None:
    failures = parity_failures(report)
    if failures:
        examples = [c for c in report.cases if "mismatch" in c]
        hint = "" if report.variant == "fp32" else f" (leave {report.variant} out of --variants to publish the rest)"
        raise ExportError("parity check failed, nothing was published: " + "; ".join(failures) + hint
                          + ("\n  " + "\n  ".join(examples) if examples else ""))


def _split_file(cfg, splits: tuple[str, ...]) -> Path:
    """The first of the run's split files that exists (paths are as the run's config wrote them)."""
    named = [(s, getattr(cfg, s)) for s in splits if getattr(cfg, s)]
    for _, path in named:
        if Path(path).is_file():
            return Path(path)
    tried = ", ".join(f"{s}={p!r}" for s, p in named) or "none configured"
    raise ExportError(f"export needs the run's {' or '.join(splits)} split for parity inputs and metrics; "
                      f"no file found ({tried}; relative paths are read from {Path.cwd()})")


def _texts(kind: str, path: Path) -> list[str]:
    from training.data.files import read_documents, read_pairs

    return read_documents(path) if kind == "lm" else [s for s, _ in read_pairs(path)]


def model_sizes(model) -> ModelSizes:
    a = model.args
    if model.kind == "lm":
        return ModelSizes(embedding_size=a.embedding_size, hidden_size=a.hidden_size, num_layers=a.num_layers,
                          vocab_size=a.vocab_size, tie_weights=a.tie_weights)
    return ModelSizes(embedding_size=a.embedding_size, hidden_size=a.hidden_size, num_layers=a.num_layers,
                      vocab_size=a.target_vocab_size, source_vocab_size=a.source_vocab_size,
                      encoder_hidden_size=model.encoder.hidden_size, encoder_layers=a.num_layers,
                      bidirectional_encoder=a.bidirectional, attention=a.attention,
                      input_feeding=a.input_feeding)


def special_tokens(tokenizers: dict) -> SpecialTokens:
    ids = special_ids()
    for role, tokenizer in tokenizers.items():
        for token, expected in ids.items():
            if tokenizer.token_to_id(token) != expected:
                raise ExportError(f"the {role} tokenizer has {token} at id {tokenizer.token_to_id(token)}, "
                                  f"not {expected} as every seqserve tokenizer must")
    return SpecialTokens(pad_id=ids["<pad>"], bos_id=ids["<bos>"], eos_id=ids["<eos>"], unk_id=ids["<unk>"])


def provenance(src: _Source) -> dict[str, str]:
    cfg = src.config.to_dict()
    progress = src.payload.get("progress", {})
    return {
        "run": str(src.run.resolve()),
        "checkpoint": src.checkpoint.name,
        "config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest(),
        "global_step": str(progress.get("global_step", "")),
        # The checkpoint's epoch counter names the epoch about to start.
        "epochs_completed": str(progress["epoch"] - 1) if "epoch" in progress else "",
        "best_valid_loss": str((src.payload.get("schedule") or {}).get("best", "")),
        "task": cfg["task"],
        **{f"{split}_file": cfg[split] for split in ("train", "valid", "test") if cfg[split]},
    }


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def publish(staging: Path, target: Path) -> None:
    """fsync every file and the staging directory, then rename it to `target`; never replace a version."""
    # mkdtemp and mkstemp make private (0700/0600) entries; a bundle is read by the server, which may
    # run as another user, so it gets the permissions an ordinary write would have given it.
    umask = _umask()
    for path in staging.iterdir():
        os.chmod(path, 0o666 & ~umask)
        _fsync(path)
    os.chmod(staging, 0o777 & ~umask)
    _fsync(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise ExportError(f"{target} appeared while exporting; versions are never overwritten")
    # A rename within one filesystem is atomic: readers see no bundle or the whole bundle.
    os.rename(staging, target)
    _fsync(target.parent)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
