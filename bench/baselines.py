"""Baselines served in the same harness: the same `Generate` RPC and the same weights, no seqserve engine.

- `torch`: what a user writes without us, a grpc.aio server running the PyTorch model eagerly under
  `torch.inference_mode`, one request at a time (a lock), one token per message.
- `ort`: ONNX Runtime per request, the bundle's own step graph, each request decoded alone.
- `null`: no model at all, one message per token: the message path's own ceiling on this machine.

And the ceiling figures measured in the run: this machine's fp32 GEMM rate (numpy and torch), and
ONNX Runtime's bare batched step (the session opened exactly as the server opens it).

Run a baseline server: `python -m bench.baselines torch|ort|null --repository DIR --name NAME
--checkpoint FILE --port P`; it prints `ready PORT` when it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from seqserve.v1 import service_pb2 as pb
from seqserve.v1 import service_pb2_grpc as pb_grpc

BASELINES = ("torch", "ort", "null")
_GREEDY = (pb.DecodingOptions.STRATEGY_UNSPECIFIED, pb.DecodingOptions.STRATEGY_GREEDY)


class _OneAtATime(pb_grpc.SeqserveServicer):
    """Generate: encode, then one token per message from `first`/`next_log_probs`, requests in turn."""

    def __init__(self, tokenizer, bos: int, eos: int, model_name: str):
        self.tokenizer, self.bos, self.eos, self.model_name = tokenizer, bos, eos, model_name
        self.lock = asyncio.Lock()

    async def Generate(self, request, context):
        if request.model != self.model_name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model!r}")
        options = request.options
        limit = options.max_new_tokens or 64
        prompt = [self.bos, *(self.tokenizer.encode(request.prompt).ids if request.prompt else [])]
        rng = np.random.default_rng(options.seed if options.HasField("seed") else None)
        sample = options.strategy not in _GREEDY  # beam is not offered: sampled like a user would
        async with self.lock:
            log_probs = self.first(prompt)
            generated = []
            for index in range(limit):
                if index < options.min_new_tokens:
                    log_probs[self.eos] = -np.inf
                token = _sample(log_probs, options.top_k, rng) if sample else int(np.argmax(log_probs))
                if token == self.eos:
                    break
                generated.append(token)
                yield pb.GenerateResponse(chunk=pb.TokenChunk(
                    token_ids=[token], text=self.tokenizer.decode([token]), first_token_index=index))
                if index + 1 < limit:
                    log_probs = self.next_log_probs(token)
        reason = pb.FINISH_REASON_LENGTH if len(generated) == limit else pb.FINISH_REASON_EOS
        yield pb.GenerateResponse(done=pb.GenerationDone(
            finish_reason=reason, prompt_tokens=len(prompt), generated_tokens=len(generated),
            text=self.tokenizer.decode(generated), model=self.model_name, version=1))


def _sample(log_probs: np.ndarray, top_k: int, rng) -> int:
    if top_k:
        keep = np.argpartition(-log_probs, top_k - 1)[:top_k]
        probs = np.exp(log_probs[keep] - log_probs[keep].max())
        return int(keep[rng.choice(len(keep), p=probs / probs.sum())])
    probs = np.exp(log_probs - log_probs.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))


class TorchServicer(_OneAtATime):
    """Eager PyTorch: embedding -> nn.LSTM/GRU with its own [layers, B, H] state -> linear -> log_softmax."""

    def __init__(self, checkpoint: Path, name: str, threads: int = 0):
        import torch

        if threads:
            torch.set_num_threads(threads)

        from training.checkpoint import load_checkpoint, model_from_checkpoint, tokenizers_from_checkpoint

        payload = load_checkpoint(checkpoint)
        self.torch, self.model = torch, model_from_checkpoint(payload).eval()
        super().__init__(tokenizers_from_checkpoint(payload)["text"], 1, 2, name)
        self.state = None

    def _run(self, tokens: list[int]) -> np.ndarray:
        torch, model = self.torch, self.model
        with torch.inference_mode():
            out, self.state = model.rnn(model.embedding(torch.tensor([tokens])), self.state)
            return torch.log_softmax(model.output(out[0, -1]), dim=-1).numpy()

    def first(self, prompt: list[int]) -> np.ndarray:
        self.state = None  # zero state
        return self._run(prompt)

    def next_log_probs(self, token: int) -> np.ndarray:
        return self._run([token])


class OrtServicer(_OneAtATime):
    """The bundle's step graph through ONNX Runtime, batch 1, opened as the server opens it."""

    def __init__(self, bundle_dir: Path, name: str):
        from server.bundle import load_bundle

        bundle = load_bundle(bundle_dir)
        special = bundle.manifest.special_tokens
        super().__init__(bundle.tokenizer("text"), special.bos_id, special.eos_id, name)
        self.graph = bundle.graph("step")
        self.zero = {n: np.zeros([1, *_state_shape(self.graph, n)], dtype=np.float32)
                     for n in self.graph.state_inputs}
        self.state = dict(self.zero)

    def _run(self, tokens: list[int]) -> np.ndarray:
        names = self.graph.input_names
        feeds = {names[0]: np.array([tokens], dtype=np.int64), names[1]: np.array([len(tokens)], dtype=np.int64),
                 **self.state}
        outputs = dict(zip(self.graph.output_names, self.graph.session.run(None, feeds), strict=True))
        self.state = {n: outputs[o] for n, o in zip(self.graph.state_inputs, self.graph.state_outputs, strict=True)}
        return outputs["log_probs"][0, -1]

    def first(self, prompt: list[int]) -> np.ndarray:
        self.state = dict(self.zero)
        return self._run(prompt)

    def next_log_probs(self, token: int) -> np.ndarray:
        return self._run([token])


def _state_shape(graph, name: str) -> list[int]:
    spec = next(t for t in graph.spec.inputs if t.name == name)
    return [int(d) for d in spec.shape[1:]]


class NullServicer(pb_grpc.SeqserveServicer):
    """No model: the requested number of tokens, one message each, as fast as grpc.aio sends them."""

    async def Generate(self, request, context):
        limit = request.options.max_new_tokens or 64
        for index in range(limit):
            yield pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=[4], text=" w4", first_token_index=index))
        yield pb.GenerateResponse(done=pb.GenerationDone(
            finish_reason=pb.FINISH_REASON_LENGTH, generated_tokens=limit, model=request.model, version=1))


async def serve_baseline(kind: str, port: int, repository: str, name: str, checkpoint: str,
                         threads: int = 0) -> None:
    if kind == "torch":
        servicer = TorchServicer(Path(checkpoint), name, threads)
    elif kind == "ort":
        servicer = OrtServicer(Path(repository) / name / "1", name)
    else:
        servicer = NullServicer()
    server = grpc.aio.server()
    pb_grpc.add_SeqserveServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"ready {bound}", flush=True)
    await server.wait_for_termination()


# --- the ceiling ----------------------------------------------------------------------------------------

def gemm_flops(size: int = 1024, seconds: float = 1.5) -> dict[str, float]:
    """This machine's best fp32 GEMM rate (FLOP/s) over repeated size x size products, numpy and torch."""
    rates = {}
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    rates["numpy"] = _best_rate(lambda: a @ a, 2 * size**3, seconds)
    try:
        import torch

        t = torch.from_numpy(a)
        rates["torch"] = _best_rate(lambda: t @ t, 2 * size**3, seconds)
    except ImportError:
        pass
    return rates


def _best_rate(fn, flops: int, seconds: float) -> float:
    fn()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return flops / best


class BareStep:
    """The LM step graph alone, opened exactly as the server opens it: `seconds(batch)` times one batched
    decode call (median over about `budget` seconds), nothing else."""

    def __init__(self, bundle_dir: str | Path, session_options: dict | None = None):
        from server.bundle import load_bundle

        self.graph = load_bundle(bundle_dir, session_options=session_options).graph("step")
        self.vocab = int(self.graph.spec.outputs[0].shape[-1])

    def seconds(self, batch: int, budget: float = 1.0) -> float:
        graph, rng = self.graph, np.random.default_rng(batch)
        feeds = {graph.input_names[0]: rng.integers(4, self.vocab, (batch, 1)),
                 graph.input_names[1]: np.ones(batch, dtype=np.int64),
                 **{n: rng.standard_normal([batch, *_state_shape(graph, n)], dtype=np.float32) * 0.1
                    for n in graph.state_inputs}}
        graph.session.run(None, feeds)
        times, end = [], time.perf_counter() + budget
        while time.perf_counter() < end or len(times) < 5:
            started = time.perf_counter()
            graph.session.run(None, feeds)
            times.append(time.perf_counter() - started)
        return statistics.median(times)


def bare_decoder_step(bundle_dir: str | Path, sources: list[str], repeat: int = 1, budget: float = 1.0,
                      session_options: dict | None = None) -> float:
    """Median seconds of one bare seq2seq decoder-step call for `sources` (encoded through the bundle's
    own tokenizer and encoder), each source's row repeated `repeat` times as beam search holds them."""
    from server.bundle import load_bundle
    from server.engine.batch import DecodeBatch
    from server.engine.runner import Runner

    bundle = load_bundle(bundle_dir, session_options=session_options)
    runner = Runner(bundle)
    tokenizer = bundle.tokenizer("source")
    memory, mask, state = runner.encode([tokenizer.encode(s).ids for s in sources])
    rows = len(sources) * repeat
    batch = DecodeBatch(tuple(np.repeat(s, repeat, axis=0) for s in state),
                        np.full(rows, bundle.manifest.special_tokens.bos_id, dtype=np.int64),
                        np.arange(rows, dtype=np.int64), np.zeros(rows, dtype=np.int64),
                        np.repeat(memory, repeat, axis=0), np.repeat(mask, repeat, axis=0))
    runner.decode(batch)
    times, end = [], time.perf_counter() + budget
    while time.perf_counter() < end or len(times) < 5:
        started = time.perf_counter()
        runner.decode(batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def ort_bare_step(bundle_dir: str | Path, batches: list[int], seconds: float = 1.0,
                  session_options: dict | None = None) -> dict[int, float]:
    """Median seconds of one bare batched decode call per batch size."""
    bare = BareStep(bundle_dir, session_options)
    return {batch: bare.seconds(batch, seconds) for batch in batches}


def machine_info() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    load = os.getloadavg()
    import onnxruntime

    return (f"{os.cpu_count()} x {cpu}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; Python "
            f"{sys.version.split()[0]}, onnxruntime {onnxruntime.__version__}, numpy {np.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=BASELINES)
    parser.add_argument("--repository", default="", help="model repository holding NAME/1 (ort)")
    parser.add_argument("--name", required=True, help="model name requests must use")
    parser.add_argument("--checkpoint", default="", help="checkpoint with the same weights (torch)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = PyTorch's default)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve_baseline(args.kind, args.port, args.repository, args.name, args.checkpoint,
                                   args.threads))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
