"""The benchmark bundles: random-weight LMs of a fixed size (LSTM and GRU, E=256, H=512, 2 layers,
V=8000) and a G2P-sized seq2seq (the trained `runs/g2p` when present), exported through the real
exporter into a cache directory and reused while their spec is unchanged.

FLOPs per generated token are counted from the sizes (2 FLOPs per multiply-add of every matrix
product; embeddings are lookups, elementwise gate math and the softmax are below 1% and left out):
LSTM 4 gates, GRU 3, per layer `gates * H * (input + H)`, plus the `H * V` output projection.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

GATES = {"lstm": 4, "gru": 3, "rnn": 1}
_LETTERS = "abcdefghijklmnopqrstuvwxyz'"
_PHONES = ("AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P R S SH T TH UH UW V W Y Z "
           "ZH").split()


@dataclass(frozen=True)
class LMSpec:
    """One benchmark language model; the bundle is NAME/1 in the cache's repository."""

    name: str
    cell: str = "lstm"
    embedding_size: int = 256
    hidden_size: int = 512
    num_layers: int = 2
    vocab_size: int = 8000
    seed: int = 0


BENCH_LMS = {"lstm": LMSpec("bench-lstm", "lstm"), "gru": LMSpec("bench-gru", "gru")}
TINY_LM = LMSpec("bench-tiny", "lstm", embedding_size=8, hidden_size=16, num_layers=1, vocab_size=64)


@dataclass(frozen=True)
class BenchBundle:
    repository: Path  # model repository to serve
    name: str  # model name in it (version 1)
    checkpoint: Path  # the same weights for the PyTorch baseline
    flops_per_token: int  # decoder FLOPs per generated token


def lm_flops_per_token(spec: LMSpec) -> int:
    """2 x multiply-adds of one LM step: the recurrent layers' gate products and the output projection."""
    macs, width = 0, spec.embedding_size
    for _ in range(spec.num_layers):
        macs += GATES[spec.cell] * spec.hidden_size * (width + spec.hidden_size)
        width = spec.hidden_size
    return 2 * (macs + spec.hidden_size * spec.vocab_size)


def seq2seq_decoder_flops(args: dict) -> int:
    """2 x multiply-adds of one seq2seq decoder step (attention over S source positions not counted)."""
    hidden, gates = args["hidden_size"], GATES[args["cell"]]
    width = args["embedding_size"] + (hidden if args.get("input_feeding", True) else 0)
    macs = 0
    for _ in range(args["num_layers"]):
        macs += gates * hidden * (width + hidden)
        width = hidden
    # general attention's query projection, the [context; h] -> H attentional layer, the output layer
    macs += hidden * hidden + 2 * hidden * hidden + hidden * args["target_vocab_size"]
    return 2 * macs


def build_lm_bundle(cache: str | Path, spec: LMSpec, progress=print) -> BenchBundle:
    """The bundle of `spec` under `cache` (models/ and runs/), exported now unless cached."""
    cache = Path(cache).resolve()
    run, repository = cache / "runs" / spec.name, cache / "models"
    bundle = BenchBundle(repository, spec.name, run / "best.pt", lm_flops_per_token(spec))
    if _cached(run, repository, spec.name, asdict(spec)):
        return bundle
    progress(f"bench: building {spec.name} ({spec.cell}, E={spec.embedding_size}, H={spec.hidden_size}, "
             f"{spec.num_layers} layers, V={spec.vocab_size}) in {cache}")
    _write_lm_run(run, spec)
    _export(run, repository, spec.name, asdict(spec), (), progress)
    return bundle


def build_seq2seq_bundle(cache: str | Path, run: str | Path | None = "runs/g2p", name: str = "bench-g2p",
                         variants: tuple[str, ...] = (), progress=print) -> BenchBundle:
    """A G2P seq2seq bundle: the trained `run` if it has a checkpoint, else random weights of its size."""
    from training.checkpoint import find_checkpoint, load_checkpoint

    cache = Path(cache).resolve()
    repository = cache / "models"
    try:
        checkpoint = find_checkpoint(run) if run else None
    except FileNotFoundError:
        checkpoint = None
    if checkpoint is None:
        run = cache / "runs" / name
        checkpoint = run / "best.pt"
        key = {"random": True, "variants": list(variants)}
        if not _cached(run, repository, name, key):
            progress(f"bench: no trained G2P run; building a random-weight G2P-sized {name}")
            _write_seq2seq_run(run)
            _export(run, repository, name, key, variants, progress)
    else:
        export_run_cached(run, repository, name, variants, progress)
    args = load_checkpoint(checkpoint)["model_args"]
    return BenchBundle(repository, name, Path(checkpoint), seq2seq_decoder_flops(args))


def export_run_cached(run: str | Path, repository: str | Path, name: str, variants: tuple[str, ...] = (),
                      progress=print) -> Path:
    """Export a trained run (its best checkpoint) as NAME/1 of `repository` unless that export is current;
    the bundle directory. A marker beside the repository remembers which checkpoint and variants it holds."""
    from training.checkpoint import find_checkpoint

    checkpoint = find_checkpoint(run)
    repository = Path(repository).resolve()
    key = {"run": str(checkpoint.resolve()), "mtime": checkpoint.stat().st_mtime, "variants": list(variants)}
    marker = repository.parent / "runs" / name
    if not _cached(marker, repository, name, key):
        progress(f"bench: exporting {checkpoint} as {name} (variants: {', '.join(variants) or 'none'})")
        marker.mkdir(parents=True, exist_ok=True)
        _export(Path(run), repository, name, key, variants, progress, marker=marker)
    return repository / name / "1"


def _cached(run: Path, repository: Path, name: str, key: dict) -> bool:
    spec_file = run / "bench-spec.json"
    manifest = repository / name / "1" / "manifest.json"
    return manifest.is_file() and spec_file.is_file() and json.loads(spec_file.read_text()) == _with_format(key)


def _with_format(key: dict) -> dict:
    """A cache key that also names the exporter's graph format: bundles of an older one are rebuilt."""
    from exporters.onnx_graphs import GRAPH_FORMAT

    return {**key, "graph_format": GRAPH_FORMAT}


def _export(run: Path, repository: Path, name: str, key: dict, variants: tuple[str, ...], progress,
            marker: Path | None = None) -> None:
    """Export with a quick parity check (a benchmark needs a loadable, correct bundle, not the full
    export contract); replaces whatever NAME held."""
    from exporters.bundle import ExportOptions, export_run
    from exporters.parity import ParitySettings, Thresholds

    shutil.rmtree(repository / name, ignore_errors=True)
    options = ExportOptions(
        variants=tuple(variants), eval_limit=50, real_inputs=16,
        # Random weights make near-ties in greedy choices likely; tensor parity stays at 1e-4.
        thresholds=Thresholds(min_greedy_agreement=0.75, min_beam_agreement=None),
        parity=ParitySettings(greedy_inputs=8, beam_inputs=4, beam_size=3, max_new_tokens=8,
                              batch_sizes=(1, 5), lengths=(1, 6)))
    export_run(run, repository, name, version=1, options=options, progress=lambda line: progress(f"  {line}"))
    (marker or run).mkdir(parents=True, exist_ok=True)
    ((marker or run) / "bench-spec.json").write_text(json.dumps(_with_format(key), sort_keys=True))


def _word_tokenizer(symbols: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from training.tokenizer import SPECIAL_TOKENS, UNK

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *symbols])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.encode_special_tokens = True
    return tokenizer


def _char_tokenizer(symbols: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from training.tokenizer import SPECIAL_TOKENS, UNK

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *symbols])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.encode_special_tokens = True
    return tokenizer


def lm_words(spec: LMSpec) -> list[str]:
    """The benchmark LM's vocabulary after the four special tokens: w4 .. w{V-1}."""
    return [f"w{i}" for i in range(4, spec.vocab_size)]


def _write_lm_run(run: Path, spec: LMSpec) -> None:
    import torch

    from training.checkpoint import save_checkpoint
    from training.config import TrainConfig
    from training.models import LanguageModel, LMArgs

    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    words, rng = lm_words(spec), random.Random(spec.seed)
    paths = {}
    for split in ("train", "valid", "test"):
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 24))) for _ in range(40)]
        paths[split] = run / f"{split}.txt"
        paths[split].write_text("\n".join(docs) + "\n", encoding="utf-8")
    torch.manual_seed(spec.seed)
    model = LanguageModel(LMArgs(vocab_size=spec.vocab_size, cell=spec.cell, embedding_size=spec.embedding_size,
                                 hidden_size=spec.hidden_size, num_layers=spec.num_layers, dropout=0.0)).eval()
    with torch.no_grad():
        # A trained model's predictions are peaked; default init gives near-uniform log-probs whose
        # near-ties make greedy parity a coin toss. Sharpen, and keep <eos> unlikely.
        model.output.weight.mul_(16.0)
        model.output.bias[2] = -20.0
    cfg = TrainConfig(kind="lm", tokenizer="word", cell=spec.cell, embedding_size=spec.embedding_size,
                      hidden_size=spec.hidden_size, num_layers=spec.num_layers, dropout=0.0,
                      **{split: str(path) for split, path in paths.items()})
    save_checkpoint(run / "best.pt", model=model, cfg=cfg, tokenizers={"text": _word_tokenizer(words)})


def _write_seq2seq_run(run: Path) -> None:
    import torch

    from training.checkpoint import save_checkpoint
    from training.config import TrainConfig
    from training.models import Seq2Seq, Seq2SeqArgs

    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    rng = random.Random(0)
    paths = {}
    for split in ("train", "valid", "test"):
        lines = []
        for _ in range(40):
            word = "".join(rng.choice(_LETTERS[:-1]) for _ in range(rng.randint(3, 10)))
            lines.append(f"{word}\t{' '.join(rng.choice(_PHONES) for _ in word)}")
        paths[split] = run / f"{split}.tsv"
        paths[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    args = Seq2SeqArgs(source_vocab_size=4 + len(_LETTERS), target_vocab_size=4 + len(_PHONES), cell="lstm",
                       embedding_size=256, hidden_size=512, num_layers=2, dropout=0.0)
    model = Seq2Seq(args).eval()
    cfg = TrainConfig(kind="seq2seq", task="g2p", source_tokenizer="char", target_tokenizer="word",
                      cell="lstm", embedding_size=256, hidden_size=512, num_layers=2, dropout=0.0,
                      **{split: str(path) for split, path in paths.items()})
    save_checkpoint(run / "best.pt", model=model, cfg=cfg,
                    tokenizers={"source": _char_tokenizer(_LETTERS), "target": _word_tokenizer(list(_PHONES))})


def g2p_sources(count: int, path: str = "data/cmudict/test.tsv") -> list[str]:
    """`count` words spread over the cmudict test split (made-up words if the split is not there)."""
    if Path(path).is_file():
        words = [line.split("\t")[0] for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
        step = max(1, len(words) // count)
        return words[::step][:count]
    return [f"word{i}" for i in range(count)]
