"""What a stateful session costs on the benchmark LSTM (E=256, H=512, 2 layers, V=8000, random weights).

- memory: recurrent state bytes per session, all-in bytes per idle session (state, history, the
  manager's bookkeeping; measured with tracemalloc over many sessions), sessions per GiB;
- time, median of repeats: ForkSession, Feed of 100 tokens (one batched prefill; also with their
  log-probs), the same feed from many sessions at once (rows of one prefill call), a record's
  serialisation and its reading back;
  in process (SessionManager on the engine, as the server runs it) and over gRPC (a real server on
  127.0.0.1, port 0; adds the RPC's own cost).

    python bench/sessions.py [--repeats 50] [--feed-tokens 100] [--sessions 2000] [--threads 1] [--json FILE]

With `--stores memory,sqlite,redis`, instead: the session stores side by side under a session mix of
`--mix-sessions` concurrent sessions over gRPC (bench/session_stores.py).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import models  # noqa: E402
from bench.serve import DEFAULT_CACHE  # noqa: E402
from server.decoding.limits import RequestLimits
from server.engine import EngineConfig  # noqa: E402
from server.registry import ModelRegistry  # noqa: E402
from server.sessions import SessionLimits, SessionManager, SessionRecord  # noqa: E402

GIB = 1 << 30


def median_seconds(samples: list[float]) -> float:
    return statistics.median(samples)


async def in_process(repository: Path, name: str, text: str, args) -> dict:
    registry = ModelRegistry(repository, config=EngineConfig(limits=RequestLimits(max_input_tokens=4096)),
                             session_options={"intra_op_num_threads": args.threads})
    await registry.start()
    limits = SessionLimits(max_sessions=args.sessions + args.concurrent + 16)
    manager = SessionManager(registry, limits)
    engine = await registry.get(name)
    results: dict = {}
    try:
        tokens = engine.bundle.tokenizer("text").encode(text).ids
        assert len(tokens) == args.feed_tokens, f"the feed text is {len(tokens)} tokens, not {args.feed_tokens}"

        # --- memory ---------------------------------------------------------------------------------
        first = await manager.create(name)
        results["state_bytes"] = first.state_bytes
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        created = [(await manager.create(name)).session_id for _ in range(args.sessions)]
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        results["bytes_per_idle_session"] = (after - before) / args.sessions
        for session_id in created:
            await manager.close(session_id)
        results["history_bytes_per_token"] = 4  # int32 token ids
        results["history_window"] = limits.history_tokens  # the most a session keeps

        # --- time -----------------------------------------------------------------------------------
        session = (await manager.create(name, prefix=text)).session_id
        for _ in range(3):  # warm-up: prefill shapes, allocator
            await manager.feed(session, text)
        feeds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            await manager.feed(session, text)
            feeds.append(time.perf_counter() - started)
        results["feed_s"] = median_seconds(feeds)
        scored = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            await manager.feed(session, text, want_log_probs=True)
            scored.append(time.perf_counter() - started)
        results["feed_log_probs_s"] = median_seconds(scored)

        record = await manager.record_of(session)
        state = record.state
        raw = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            await engine.feed(state, tokens)
            raw.append(time.perf_counter() - started)
        results["engine_feed_s"] = median_seconds(raw)

        forks = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            fork = await manager.fork(session)
            forks.append(time.perf_counter() - started)
            await manager.close(fork.session_id)
        results["fork_s"] = median_seconds(forks)
        copies = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            record.copy_as("x" * 32, 600, 0.0)
            copies.append(time.perf_counter() - started)
        results["state_copy_s"] = median_seconds(copies)

        data = record.to_bytes()
        results["serialised_bytes"] = len(data)
        results["history_tokens"] = len(record.history)
        dumps, loads = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            record.to_bytes()
            dumps.append(time.perf_counter() - started)
            started = time.perf_counter()
            SessionRecord.from_bytes(data)
            loads.append(time.perf_counter() - started)
        results["to_bytes_s"], results["from_bytes_s"] = median_seconds(dumps), median_seconds(loads)

        # Many sessions feeding at once: their feeds are rows of one prefill call.
        crowd = [(await manager.create(name)).session_id for _ in range(args.concurrent)]
        await asyncio.gather(*(manager.feed(s, text) for s in crowd))
        rounds = []
        for _ in range(max(3, args.repeats // 10)):
            started = time.perf_counter()
            await asyncio.gather(*(manager.feed(s, text) for s in crowd))
            rounds.append(time.perf_counter() - started)
        results["concurrent_feed_round_s"] = median_seconds(rounds)
    finally:
        await manager.stop()
        await registry.stop(1.0)
    return results


def over_grpc(repository: Path, name: str, text: str, args) -> dict:
    import grpc

    from seqserve.v1 import service_pb2 as pb
    from seqserve.v1 import service_pb2_grpc as pb_grpc
    from server.app import ServerThread
    from server.config import ServerConfig

    config = ServerConfig(repository=str(repository), port=0, metrics_port=-1, poll_interval_seconds=0,
                          max_input_tokens=max(512, args.feed_tokens), intra_op_threads=args.threads,
                          log_level="warning")
    results = {}
    with ServerThread(config) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SeqserveStub(channel)

        def timed(call, request) -> tuple[float, object]:
            started = time.perf_counter()
            response = call(request)
            return time.perf_counter() - started, response

        session = stub.CreateSession(pb.CreateSessionRequest(model=name, prefix=text)).session_id
        feed = pb.FeedRequest(session_id=session, text=text)
        for _ in range(3):
            stub.Feed(feed)
        results["grpc_feed_s"] = median_seconds([timed(stub.Feed, feed)[0] for _ in range(args.repeats)])
        forks = []
        for _ in range(args.repeats):
            seconds, fork = timed(stub.ForkSession, pb.ForkSessionRequest(session_id=session))
            forks.append(seconds)
            stub.CloseSession(pb.CloseSessionRequest(session_id=fork.session_id))
        results["grpc_fork_s"] = median_seconds(forks)
        results["grpc_get_s"] = median_seconds([timed(stub.GetSession, pb.GetSessionRequest(session_id=session))[0]
                                                for _ in range(args.repeats)])
    return results


def report(r: dict, args, spec) -> str:
    ms = 1e3
    rows = [
        ("recurrent state per session", f"{r['state_bytes']:,} B (2 x [1, {spec.num_layers}, {spec.hidden_size}] "
                                        "float32: h and c)"),
        ("all-in per idle session", f"{r['bytes_per_idle_session']:,.0f} B (state, 1-token history, bookkeeping)"),
        ("history", f"{r['history_bytes_per_token']} B per token (int32), besides the state"),
        ("sessions per GiB, state only", f"{GIB / r['state_bytes']:,.0f}"),
        ("sessions per GiB, all-in (idle)", f"{GIB / r['bytes_per_idle_session']:,.0f}"),
        (f"sessions per GiB, all-in with a full {r['history_window']}-token text tail",
         f"{GIB / (r['bytes_per_idle_session'] + 4 * (r['history_window'] - 1)):,.0f}"),
        ("fork (SessionManager)", f"{r['fork_s'] * ms:.3f} ms  (state copy alone: {r['state_copy_s'] * 1e6:.1f} us)"),
        ("fork (ForkSession over gRPC)", f"{r['grpc_fork_s'] * ms:.3f} ms"),
        (f"feed {args.feed_tokens} tokens (SessionManager)", f"{r['feed_s'] * ms:.2f} ms "
                                                              f"(engine.feed alone: {r['engine_feed_s'] * ms:.2f} ms)"),
        (f"feed {args.feed_tokens} tokens with their log-probs (SessionManager)",
         f"{r['feed_log_probs_s'] * ms:.2f} ms"),
        (f"feed {args.feed_tokens} tokens (Feed over gRPC)", f"{r['grpc_feed_s'] * ms:.2f} ms"),
        (f"{args.concurrent} sessions feeding {args.feed_tokens} tokens at once",
         f"{r['concurrent_feed_round_s'] * ms:.1f} ms per round = "
         f"{r['concurrent_feed_round_s'] / args.concurrent * ms:.2f} ms per feed, "
         f"{args.concurrent * args.feed_tokens / r['concurrent_feed_round_s']:,.0f} fed tokens/s"),
        ("GetSession over gRPC", f"{r['grpc_get_s'] * ms:.3f} ms"),
        (f"serialise a record ({r['history_tokens']} history tokens)",
         f"{r['serialised_bytes']:,} B: to_bytes {r['to_bytes_s'] * 1e6:.0f} us, "
         f"from_bytes {r['from_bytes_s'] * 1e6:.0f} us"),
    ]
    lines = ["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="where bundles are built and kept (%(default)s)")
    parser.add_argument("--model", default="lstm", choices=sorted(models.BENCH_LMS), help="benchmark LM")
    parser.add_argument("--repeats", type=int, default=50, help="timed repeats; medians are reported")
    parser.add_argument("--feed-tokens", type=int, default=100, help="tokens of each timed feed")
    parser.add_argument("--sessions", type=int, default=2000, help="idle sessions for the memory measure")
    parser.add_argument("--concurrent", type=int, default=64, help="sessions feeding at once")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    parser.add_argument("--stores", default="", help="compare these session stores (memory,sqlite,redis) instead")
    parser.add_argument("--mix-sessions", type=int, default=32, help="--stores: concurrent sessions")
    parser.add_argument("--mix-rounds", type=int, default=5, help="--stores: feed + generate rounds per session")
    parser.add_argument("--mix-repeats", type=int, default=3, help="--stores: mixes per store, taking turns")
    args = parser.parse_args(argv)

    spec = models.BENCH_LMS[args.model]
    bundle = models.build_lm_bundle(Path(args.cache).expanduser(), spec)
    if args.stores:
        from bench import session_stores

        stores = tuple(s.strip() for s in args.stores.split(",") if s.strip())
        unknown = set(stores) - set(session_stores.STORES)
        if unknown:
            parser.error(f"--stores: unknown {', '.join(sorted(unknown))}; known: {', '.join(session_stores.STORES)}")
        results = session_stores.compare(bundle.repository, bundle.name, models.lm_words(spec), stores=stores,
                                         sessions=args.mix_sessions, rounds=args.mix_rounds, threads=args.threads,
                                         repeats=args.mix_repeats)
        print(f"{bundle.name}: {spec.cell.upper()} E={spec.embedding_size} H={spec.hidden_size} "
              f"{spec.num_layers} layers V={spec.vocab_size}; {args.mix_sessions} sessions x {args.mix_rounds} rounds "
              f"(feed 10 words, generate 20 tokens); {platform.processor() or platform.machine()}\n")
        print(session_stores.report(results, args.mix_sessions))
        if args.json:
            Path(args.json).write_text(json.dumps({"model": bundle.name, "args": vars(args), **results}, indent=2))
        return 0
    rng = random.Random(0)
    text = " ".join(rng.choice(models.lm_words(spec)) for _ in range(args.feed_tokens))
    results = asyncio.run(in_process(bundle.repository, bundle.name, text, args))
    results.update(over_grpc(bundle.repository, bundle.name, text, args))
    print(f"{bundle.name}: {spec.cell.upper()} E={spec.embedding_size} H={spec.hidden_size} "
          f"{spec.num_layers} layers V={spec.vocab_size}; CPUExecutionProvider, {args.threads} intra-op thread(s); "
          f"{platform.processor() or platform.machine()}; medians of {args.repeats}\n")
    print(report(results, args, spec))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": bundle.name, "args": vars(args), **results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
