"""Parity of exported graphs with PyTorch: the same inputs through both, the figures in a ParityReport.

Three checks: tensors (log-probs and every other output, random and real inputs over a batch x length
grid), greedy decoding token for token, and beam search n-best lists. The ONNX Runtime side of the
decoding checks is the reference decoder (`training.models.decoding`) driving an ORT-backed model whose
glue (`step_fn`, `prefill`, `start`, teacher-forced `forward`) is the PyTorch model's own code, so the
graphs are the only thing that differs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from seqserve.bundle.spec import GraphSpec
from seqserve.v1.manifest_pb2 import Graph, ParityReport
from training.batching import BOS, EOS, lm_stream, make_pair_batch
from training.models.decoding import beam_search, greedy_decode
from training.models.lm import LanguageModel
from training.models.seq2seq import Seq2Seq

BATCH_SIZES = (1, 3, 64)
LENGTHS = (1, 2, 37)
_DECODE_CHUNK = 64  # inputs decoded together; large enough to be quick, small enough for beam x 5 rows
_MAX_PROMPT = 24  # LM prompts are a document's first 0..24 tokens after <bos>
_DECODER_STEPS = 4  # decoder steps compared per seq2seq tensor case
_MISMATCH_EXAMPLES = 3  # decoding mismatches quoted in the report

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32}


@dataclass(frozen=True)
class Thresholds:
    """Limits a variant is judged against; None means the figure is recorded but not judged."""

    max_abs_diff_log_probs: float | None = 1e-4
    max_abs_diff_state: float | None = 1e-4
    min_greedy_agreement: float = 1.0  # fraction of inputs whose greedy output matches exactly
    min_beam_agreement: float | None = 1.0  # fraction of inputs whose n-best lists match exactly

    def as_map(self) -> dict[str, float]:
        return {k: float(v) for k, v in vars(self).items() if v is not None}


FP32_THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class ParitySettings:
    """How much to check; the defaults are the export contract, tests pass smaller figures."""

    greedy_inputs: int = 200
    beam_inputs: int = 200
    beam_size: int = 5
    max_new_tokens: int = 50
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    lengths: tuple[int, ...] = LENGTHS
    seed: int = 0


# --- ONNX Runtime behind the PyTorch models' interface ---------------------------------------------------

def make_session(path: str | Path, providers=("CPUExecutionProvider",)) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the unused input_feed of a model without input feeding is expected
    # Parity is about results, not speed: one thread, never spinning, so ONNX Runtime and PyTorch
    # (which runs between the calls) do not fight over the cores.
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


class GraphRunner:
    """One ONNX Runtime session called with torch tensors in the manifest's input order."""

    def __init__(self, session: ort.InferenceSession, spec: Graph):
        self.session = session
        self.spec = spec
        types = {arg.name: _NUMPY_TYPES[arg.type] for arg in session.get_inputs()}
        self.inputs = [(t.name, types[t.name]) for t in spec.inputs]
        self.outputs = [t.name for t in spec.outputs]

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feed = {name: np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)
                for (name, dtype), t in zip(self.inputs, tensors, strict=True)}
        results = self.session.run(self.outputs, feed)
        # Variants may compute in float16; the decoders and comparisons work in float32.
        return tuple(torch.from_numpy(r.astype(np.float32) if r.dtype == np.float16 else r) for r in results)


class OrtLanguageModel:
    """An LM's step graph behind LanguageModel's interface (call, logits, initial_state, step_fn, prefill).

    `prefill_graph`, the bundle's prefill graph when it has one, is checked by the tensor grid.
    """

    kind = "lm"
    providers: list[str] = []  # what ONNX Runtime gave the session, set when it is opened
    step_fn = LanguageModel.step_fn
    prefill = LanguageModel.prefill

    def __init__(self, step: GraphRunner, prefill_graph: GraphRunner | None = None):
        self.step = step
        self.prefill_graph = prefill_graph
        self.state_shapes = GraphSpec.from_pb(step.spec).state_shapes  # as the server reads them (ModelSpec)

    def eval(self):
        return self

    def initial_state(self, batch: int, device=None) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(batch, *shape) for shape in self.state_shapes)

    def __call__(self, tokens, lengths, *state):
        return self.step(tokens, lengths, *state)

    def logits(self, tokens, lengths, state):
        # Log-probs stand in for logits: log_softmax is idempotent, so cross-entropy is unchanged.
        log_probs, *new_state = self.step(tokens, lengths, *state)
        return log_probs, tuple(new_state)


class OrtSeq2Seq:
    """Encoder and decoder-step graphs with Seq2Seq's interface (encode, decode_step, step_fn, start)."""

    kind = "seq2seq"
    providers: list[str] = []
    step_fn = Seq2Seq.step_fn
    start = Seq2Seq.start
    forward = Seq2Seq.forward  # teacher forcing, for the evaluation's NLL

    def __init__(self, encoder: GraphRunner, decoder: GraphRunner):
        self.encoder = encoder
        self.decoder = decoder

    def eval(self):
        return self

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def encode(self, src, src_lengths):
        memory, mask, *state = self.encoder(src, src_lengths)
        return memory, mask, tuple(state)

    def decode_step(self, prev_token, *inputs):
        return self.decoder(prev_token, *inputs)

    def decode_step_logits(self, prev_token, state, memory, mask):
        log_probs, *rest = self.decoder(prev_token, *state, memory, mask)
        return log_probs, tuple(rest[: len(state)]), rest[len(state)]


def open_ort_model(directory: str | Path, graphs: list[Graph], providers=("CPUExecutionProvider",)):
    """The ORT-backed model for one variant's graphs; `.providers` says what ONNX Runtime gave it."""
    runners = {g.role: GraphRunner(make_session(Path(directory) / g.file, providers), g) for g in graphs}
    return _ort_model(runners)


def ort_model_from_bundle(bundle):
    """The ORT-backed model over the sessions of a `server.bundle.LoadedBundle`, as the server opened them."""
    return _ort_model({role: GraphRunner(g.session, g.spec) for role, g in bundle.graphs.items()})


def _ort_model(runners: dict[str, GraphRunner]):
    if "step" in runners:
        model = OrtLanguageModel(runners["step"], runners.get("prefill"))
    else:
        model = OrtSeq2Seq(runners["encoder"], runners["decoder_step"])
    model.providers = list(next(iter(runners.values())).session.get_providers())
    return model


# --- real inputs -------------------------------------------------------------------------------------------

def real_sequences(kind: str, texts: list[str], tokenizers, limit: int, seed: int = 0) -> list[list[int]]:
    """Token ids of up to `limit` texts (LM documents or seq2seq sources), a seeded sample."""
    texts = list(dict.fromkeys(texts))  # a source with several references counts once
    if len(texts) > limit:
        texts = random.Random(seed).sample(texts, limit)
    tokenizer = tokenizers["text" if kind == "lm" else "source"]
    return [e.ids for e in tokenizer.encode_batch(texts)]


# --- the checks --------------------------------------------------------------------------------------------

@dataclass
class _Figures:
    log_probs: float = 0.0
    state: float = 0.0
    cases: list[str] = field(default_factory=list)

    def add(self, label: str, log_probs: float, state: float) -> None:
        self.log_probs, self.state = max(self.log_probs, log_probs), max(self.state, state)
        self.cases.append(f"{label}: log_probs {log_probs:.2e}, state {state:.2e}")


def _max_diff(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None = None) -> float:
    diff = (a.float() - b.float()).abs()
    diff = diff[where] if where is not None else diff
    return float(diff.max()) if diff.numel() else 0.0


def _lm_case(model, ort_model, tokens, lengths, state_in) -> tuple[float, float]:
    ref = model(tokens, lengths, *state_in)
    got = ort_model(tokens, lengths, *state_in)
    # Positions past a row's length are padding: their outputs mean nothing and are not compared.
    valid = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
    state = max(_max_diff(r, g) for r, g in zip(ref[1:], got[1:], strict=True))
    log_probs = _max_diff(ref[0], got[0], valid)
    if ort_model.prefill_graph is not None:  # the prefill graph's outputs count too
        prefilled = ort_model.prefill_graph(tokens, lengths, *state_in)
        states = len(ref) - 1
        state = max(state, *(_max_diff(r, g) for r, g in zip(ref[1:], prefilled[:states], strict=True)))
        if len(prefilled) > states:  # last_log_probs: after each row's last token
            last = ref[0][torch.arange(len(lengths)), lengths - 1]
            log_probs = max(log_probs, _max_diff(last, prefilled[states]))
    return log_probs, state


def _seq2seq_case(model, ort_model, src, src_lengths, next_tokens) -> tuple[float, float]:
    """The encoder's outputs, then a few decoder steps.

    Every decoder step gets identical inputs on both sides (PyTorch's memory and state), so the figures
    measure the graph, not float32 drift compounding over steps in an unbounded LSTM cell state; drift
    over whole sequences is what the greedy and beam checks judge.
    """
    memory, mask, state = model.encode(src, src_lengths)
    got_memory, got_mask, got_state = ort_model.encode(src, src_lengths)
    state_diff = max(_max_diff(memory, got_memory, mask.bool()), _max_diff(mask, got_mask),
                     *(_max_diff(r, g) for r, g in zip(state, got_state, strict=True)))
    log_probs_diff = 0.0
    tokens = torch.full((src.shape[0],), BOS, dtype=torch.long)
    for step in range(_DECODER_STEPS):
        ref = model.decode_step(tokens, *state, memory, mask)
        got = ort_model.decode_step(tokens, *state, memory, mask)
        log_probs_diff = max(log_probs_diff, _max_diff(ref[0], got[0]))
        # The rest: the next state and the attention weights (zero on padding on both sides).
        state_diff = max(state_diff, *(_max_diff(r, g) for r, g in zip(ref[1:], got[1:], strict=True)))
        state = ref[1:1 + len(state)]
        tokens = next_tokens(ref[0], step)
    return log_probs_diff, state_diff


def tensor_parity(model, ort_model, real: list[list[int]], settings: ParitySettings) -> _Figures:
    """Random and real inputs at every batch size x length; rows get different lengths (padding)."""
    figures = _Figures()
    gen = torch.Generator().manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    for source in ("random", "real"):
        for batch in settings.batch_sizes:
            for length in settings.lengths:
                # Row 0 fills the time axis; the others are shorter so padding is exercised.
                lengths = torch.randint(1, length + 1, (batch,), generator=gen)
                lengths[0] = length
                if model.kind == "lm":
                    vocab = model.args.vocab_size
                    if source == "random":
                        tokens = torch.randint(0, vocab, (batch, length), generator=gen)
                        zero = model.initial_state(batch)
                        state = tuple(0.5 * torch.randn(s.shape, generator=gen) for s in zero)
                    else:
                        tokens = _stream_windows(real, batch, length, rng)
                        state = model.initial_state(batch)
                    lp, st = _lm_case(model, ort_model, tokens, lengths, state)
                else:
                    vocab = model.args.target_vocab_size
                    if source == "random":
                        src = torch.randint(0, model.args.source_vocab_size, (batch, length), generator=gen)
                        next_tokens = lambda _lp, _s: torch.randint(0, vocab, (batch,), generator=gen)  # noqa: B023
                    else:
                        src, lengths = _padded_sources(real, batch, length, rng)
                        next_tokens = lambda lp, _s: lp.argmax(-1)
                    lp, st = _seq2seq_case(model, ort_model, src, lengths, next_tokens)
                figures.add(f"{source} batch={batch} length={length}", lp, st)
    return figures


def _stream_windows(real: list[list[int]], batch: int, length: int, rng: random.Random) -> torch.Tensor:
    """Windows of the documents read as one stream (<bos> doc <eos> ...), as the LM was trained."""
    stream = lm_stream(real)
    if stream.numel() < length:
        stream = stream.repeat(length // max(stream.numel(), 1) + 1)
    starts = [rng.randrange(0, stream.numel() - length + 1) for _ in range(batch)]
    return torch.stack([stream[s: s + length] for s in starts])


def _padded_sources(real: list[list[int]], batch: int, length: int, rng: random.Random):
    """Sources cut to `length`, padded to exactly `length` so the time axis is always that long."""
    rows = [rng.choice(real)[:length] or [BOS] for _ in range(batch)]
    src = torch.zeros(batch, length, dtype=torch.long)
    for i, row in enumerate(rows):
        src[i, : len(row)] = torch.tensor(row)
    return src, torch.tensor([len(r) for r in rows])


def decode_inputs(kind: str, real: list[list[int]], count: int, seed: int) -> list[list[int]]:
    """LM: prompts cut from documents (<bos> + the first 0..24 tokens); seq2seq: sources."""
    rng = random.Random(seed)
    picked = [real[i % len(real)] for i in range(count)] if real else []
    if kind == "lm":
        return [[BOS, *doc[: rng.randint(0, min(len(doc), _MAX_PROMPT))]] for doc in picked]
    return picked


def run_decoder(model, inputs: list[list[int]], settings: ParitySettings, beam: bool) -> list:
    """Greedy hypotheses (beam=False) or n-best lists (beam=True), as token lists, input by input."""
    results = []
    for i in range(0, len(inputs), _DECODE_CHUNK):
        chunk = inputs[i: i + _DECODE_CHUNK]
        if model.kind == "lm":
            start, state = model.prefill(chunk)
        else:
            batch = make_pair_batch([(src, []) for src in chunk])
            start, state = model.start(batch.src, batch.src_lengths, BOS)
        common = dict(eos_id=EOS, max_new_tokens=settings.max_new_tokens,
                      prompt_tokens=chunk if model.kind == "lm" else None)
        if beam:
            n_best = beam_search(model.step_fn(), state, start, beam_size=settings.beam_size,
                                 n_best=settings.beam_size, **common)
            results += [[h.tokens for h in hyps] for hyps in n_best]
        else:
            results += [h.tokens for h in greedy_decode(model.step_fn(), state, start, **common)]
    return results


def _agreement(name: str, ref: list, got: list, cases: list[str]) -> int:
    matched = 0
    for index, (r, g) in enumerate(zip(ref, got, strict=True)):
        if r == g:
            matched += 1
        elif len(cases) < _MISMATCH_EXAMPLES or not any(c.startswith(name) for c in cases):
            cases.append(f"{name} mismatch on input {index}: pytorch {str(r)[:120]} onnx {str(g)[:120]}")
    return matched


@torch.no_grad()
def check_parity(model, ort_model, real: list[list[int]], *, variant: str = "fp32",
                 thresholds: Thresholds = FP32_THRESHOLDS, settings: ParitySettings = ParitySettings()
                 ) -> ParityReport:
    """Compare `ort_model` (one variant's graphs) with the PyTorch `model`; `passed` says if it may ship."""
    if not real:
        raise ValueError("parity needs real inputs and none were given")
    model.eval()
    figures = tensor_parity(model, ort_model, real, settings)
    mismatches: list[str] = []
    greedy_inputs = decode_inputs(model.kind, real, settings.greedy_inputs, settings.seed)
    greedy_matched = _agreement("greedy", run_decoder(model, greedy_inputs, settings, beam=False),
                                run_decoder(ort_model, greedy_inputs, settings, beam=False), mismatches)
    beam_inputs = decode_inputs(model.kind, real, settings.beam_inputs, settings.seed + 1)
    beam_matched = _agreement("beam", run_decoder(model, beam_inputs, settings, beam=True),
                              run_decoder(ort_model, beam_inputs, settings, beam=True), mismatches)
    report = ParityReport(
        variant=variant, max_abs_diff_log_probs=figures.log_probs, max_abs_diff_state=figures.state,
        cases=[*figures.cases,
               "state = every output other than log_probs (recurrent state, memory, mask, attention; an LM's "
               "prefill graph's states included)",
               f"greedy: {len(greedy_inputs)} inputs, max_new_tokens={settings.max_new_tokens}",
               f"beam: {len(beam_inputs)} inputs, beam_size={settings.beam_size}, "
               f"n_best={settings.beam_size}", *mismatches],
        greedy_checked=len(greedy_inputs), greedy_matched=greedy_matched,
        beam_checked=len(beam_inputs), beam_matched=beam_matched,
        providers=ort_model.providers, thresholds=thresholds.as_map(),
    )
    report.passed = not parity_failures(report)
    return report


def parity_failures(report: ParityReport) -> list[str]:
    """One sentence per figure outside its threshold; empty when the report passes."""
    limits = report.thresholds
    failures = []
    for figure, what in (("max_abs_diff_log_probs", "log-probs"), ("max_abs_diff_state", "states")):
        value = getattr(report, figure)
        if figure in limits and not value <= limits[figure]:  # `not <=` also catches NaN
            failures.append(f"{report.variant} {what} differ from PyTorch by up to {value:.3g} "
                            f"(limit {limits[figure]:.3g})")
    for name, matched, checked in (("greedy", report.greedy_matched, report.greedy_checked),
                                   ("beam", report.beam_matched, report.beam_checked)):
        limit = limits.get(f"min_{name}_agreement")
        if limit is not None and checked and matched / checked < limit:
            failures.append(f"{report.variant} {name} decoding matches PyTorch on {matched}/{checked} inputs "
                            f"(needs {limit:.0%})")
    return failures
