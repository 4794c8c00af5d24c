"""The session stores side by side (memory, sqlite, redis): what durability costs a session-heavy load.

For each store, a real `seqserve serve` process on it (SQLite in a temp dir; a redis-server of its own
with `appendfsync always`, as compose runs it) and N concurrent client sessions, each: CreateSession
(a prefix), then rounds of Feed + GenerateInSession (greedy, the generated tokens kept), then
CloseSession. Reported per store: create / feed / generate latency p50 and p99, the session mix's
tokens/s (fed + generated tokens over the wall time of the whole mix), and the stored bytes per
session. The three servers run side by side and the mixes take turns (`repeats` rounds of them).
Run through `python bench/sessions.py --stores memory,sqlite,redis`.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.services import RedisServer, ServeProcess

STORES = ("memory", "sqlite", "redis")


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _mix(target: str, model: str, words: list[str], sessions: int, rounds: int, feed_words: int,
               new_tokens: int, seed: int) -> dict:
    import grpc

    from seqserve.v1 import service_pb2 as pb
    from seqserve.v1 import service_pb2_grpc as pb_grpc

    latencies: dict[str, list[float]] = {"create": [], "feed": [], "generate": []}
    tokens = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SeqserveStub(channel)
        options = pb.DecodingOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens)

        async def conversation(index: int) -> None:
            nonlocal tokens
            rng = random.Random(seed + index)

            def text() -> str:
                return " " + " ".join(rng.choice(words) for _ in range(feed_words))

            started = time.perf_counter()
            session = await stub.CreateSession(pb.CreateSessionRequest(model=model, prefix=text()))
            latencies["create"].append(time.perf_counter() - started)
            tokens += session.tokens_consumed
            metadata = (("x-session-id", session.session_id),)
            for _ in range(rounds):
                started = time.perf_counter()
                fed = await stub.Feed(pb.FeedRequest(session_id=session.session_id, text=text()), metadata=metadata)
                latencies["feed"].append(time.perf_counter() - started)
                started = time.perf_counter()
                async for response in stub.GenerateInSession(pb.GenerateInSessionRequest(
                        session_id=session.session_id, options=options), metadata=metadata):
                    if response.HasField("done"):
                        tokens += response.done.generated_tokens
                latencies["generate"].append(time.perf_counter() - started)
                tokens += fed.tokens_fed
            await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id), metadata=metadata)

        started = time.perf_counter()
        await asyncio.gather(*(conversation(i) for i in range(sessions)))
        wall = time.perf_counter() - started
    result = {"tokens_per_s": tokens / wall, "wall_s": wall, "tokens": tokens}
    for op, samples in latencies.items():
        result[f"{op}_p50_s"] = _percentile(samples, 0.5)
        result[f"{op}_p99_s"] = _percentile(samples, 0.99)
    return result


def _stored_bytes(store: str, directory: Path, redis: RedisServer | None, target: str, model: str, count: int) -> float:
    """Bytes the store holds per session, from `count` sessions left open (each with a short text)."""
    import grpc

    from seqserve.v1 import service_pb2 as pb
    from seqserve.v1 import service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SeqserveStub(channel)
        ids = [stub.CreateSession(pb.CreateSessionRequest(model=model, prefix="the")).session_id for _ in range(count)]
        state_bytes = stub.GetSession(pb.GetSessionRequest(session_id=ids[0])).state_bytes
    if store == "sqlite":
        import sqlite3

        db = sqlite3.connect(directory / "sessions.db")
        try:
            (average,) = db.execute("SELECT AVG(LENGTH(record)) FROM sessions").fetchone()
        finally:
            db.close()
        return float(average)
    if store == "redis":
        keys = list(redis.client.scan_iter("seqserve:session:*", count=1000))
        return sum(redis.client.memory_usage(key) or 0 for key in keys) / max(1, len(keys))
    return float(state_bytes)  # memory: the state arrays themselves (the record object adds ~1 KiB: docs)


def compare(repository: Path, model: str, words: list[str], *, stores=STORES, sessions: int = 32, rounds: int = 5,
            feed_words: int = 10, new_tokens: int = 20, threads: int = 1, seed: int = 0, repeats: int = 3) -> dict:
    """Every store's server is started first and the mixes then run in turn (memory, sqlite, redis, memory,
    ...), `repeats` times: on a shared machine whose load drifts, each store sees the same drift. Figures
    are the medians over the repeats; `tokens_per_s_runs` keeps every run."""
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="seqserve-bench-stores-") as temp:
        root = Path(temp)
        servers, redis = {}, None
        try:
            for store in stores:
                directory = root / store
                directory.mkdir()
                if store == "redis":
                    redis = RedisServer(directory)
                url = {"memory": "memory", "sqlite": f"sqlite:{directory}/sessions.db",
                       "redis": redis.url if redis else ""}[store]
                servers[store] = ServeProcess(repository, session_store=url, cwd=directory, timeout=300, env={
                    "SEQSERVE_INTRA_OP_THREADS": str(threads), "SEQSERVE_LOG_LEVEL": "info",
                    "SEQSERVE_MAX_SESSIONS": "100000"})
            runs: dict[str, list[dict]] = {store: [] for store in stores}
            for server in servers.values():  # warm-up
                asyncio.run(_mix(f"127.0.0.1:{server.port}", model, words, 4, 1, feed_words, new_tokens, seed + 999))
            for repeat in range(repeats):
                for store, server in servers.items():
                    runs[store].append(asyncio.run(_mix(f"127.0.0.1:{server.port}", model, words, sessions, rounds,
                                                        feed_words, new_tokens, seed + repeat)))
            for store, server in servers.items():
                median = {key: statistics.median(run[key] for run in runs[store]) for key in runs[store][0]}
                median["tokens_per_s_runs"] = [run["tokens_per_s"] for run in runs[store]]
                median["stored_bytes_per_session"] = _stored_bytes(store, root / store, redis,
                                                                   f"127.0.0.1:{server.port}", model, 200)
                results[store] = median
        finally:
            for server in servers.values():
                server.stop()
            if redis is not None:
                redis.stop()
    return results


def report(results: dict, sessions: int) -> str:
    ms = 1e3
    base = results.get("memory", {}).get("tokens_per_s")
    lines = [f"| store | create p50 / p99 | feed p50 / p99 | generate p50 / p99 | session-mix tokens/s "
             f"({sessions} sessions; median, runs) | vs memory | stored bytes per session |",
             "|---|---|---|---|---|---|---|"]
    for store, r in results.items():
        versus = f"{r['tokens_per_s'] / base:.0%}" if base else "-"
        lines.append(f"| {store} | {r['create_p50_s'] * ms:.1f} / {r['create_p99_s'] * ms:.1f} ms | "
                     f"{r['feed_p50_s'] * ms:.1f} / {r['feed_p99_s'] * ms:.1f} ms | "
                     f"{r['generate_p50_s'] * ms:.1f} / {r['generate_p99_s'] * ms:.1f} ms | "
                     f"{r['tokens_per_s']:,.0f} ({', '.join(f'{t:,.0f}' for t in r['tokens_per_s_runs'])}) | "
                     f"{versus} | {r['stored_bytes_per_session']:,.0f} |")
    return "\n".join(lines)
