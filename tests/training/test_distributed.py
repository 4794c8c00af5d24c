"""Training under real torchrun (gloo, 2 CPU processes): same losses as one process, exact resume, one writer,
and a dead or hung rank ends the run with an error instead of a hang."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.cli import torchrun_command
from training.config import TrainConfig
from training.distributed import shard
from training.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
LETTERS = "abcdef"
PHONES = dict(zip(LETTERS, "AA1 B K D EH0 F".split(), strict=True))
HANG_GUARD = 240  # seconds: only ends a test that would otherwise hang; nothing asserts on durations


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(11)
    words = sorted({"".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 5))) for _ in range(400)})
    rng.shuffle(words)
    paths = {}
    # 151 pairs in batches of 15: the last batch has one pair, so rank 1 gets none (a zero-weighted step).
    for split, items in (("train", words[:151]), ("valid", words[151:181])):
        path = root / f"{split}.tsv"
        path.write_text("".join(f"{w}\t{' '.join(PHONES[c] for c in w)}\n" for w in items))
        paths[f"seq2seq_{split}"] = str(path)
    sentences = ["the cat sat on the mat", "a dog ran to the log", "big red cat", "small blue dog sat"]
    for split, n in (("train", 90), ("valid", 15)):
        path = root / f"{split}.txt"
        path.write_text("\n".join(rng.choice(sentences) for _ in range(n)) + "\n")
        paths[f"lm_{split}"] = str(path)
    return paths


def settings(kind: str, corpus: dict, **overrides) -> dict:
    # Uneven shares on purpose: batches of 15 pairs (8 + 7) and 5 LM rows (3 + 2).
    values = dict(train=corpus[f"{kind}_train"], valid=corpus[f"{kind}_valid"], embedding_size=12, hidden_size=16,
                  num_layers=2, dropout=0.0, lr=1e-2, epochs=2, batch_size=15 if kind == "seq2seq" else 5,
                  bptt=20, early_stopping=0, device="cpu", progress=False, seed=3,
                  task="g2p" if kind == "seq2seq" else "text")
    values.update(overrides)
    return values


def torchrun_train(kind: str, values: dict, out: Path, *args: str, nproc: int = 2, env: dict | None = None,
                   **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """`seqserve train KIND --nproc N`: the launcher starts real torchrun, which starts N workers."""
    command = [sys.executable, "-m", "seqserve.cli", "train", kind, "--out", str(out), "--nproc", str(nproc), *args]
    for key, value in values.items():
        command += ["--set", f"{key}={value}"]
    environment = {**os.environ, **(env or {})}
    if popen:
        return subprocess.Popen(command, cwd=REPO, env=environment, **popen)
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=HANG_GUARD)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in log_records(run) if "loss" in r]


def test_shards_cover_the_batch_in_order():
    for count in range(0, 12):
        for world in range(1, 5):
            parts = [list(range(count))[shard(count, rank, world)] for rank in range(world)]
            assert sum(parts, []) == list(range(count))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_nproc_launches_torchrun_with_the_same_arguments():
    command = torchrun_command(3, ["lm", "--nproc", "3", "--out", "r", "--set", "seed=2", "--nproc=3"])
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                           "-m", "seqserve.cli", "train", "lm", "--out", "r", "--set", "seed=2"]
    with pytest.raises(ValueError, match="--nproc must be at least 1, got 0"):
        torchrun_command(0, [])


def test_an_lm_batch_smaller_than_the_world_is_refused_before_joining(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"batch_size must be at least the number of ranks \(3\).*got 2"):
        train(TrainConfig(kind="lm", **settings("lm", corpus, batch_size=2)), tmp_path)


AUDIT_HOOK = '''
import os, sys
_out = os.environ.get("AUDIT_WATCH")
if _out:
    _log = open(os.path.join(os.environ["AUDIT_DIR"], f"{os.environ.get('RANK', 'launcher')}-{os.getpid()}.txt"),
                "a", buffering=1)
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE)
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate"):
            path, writes = args[1] if event == "os.rename" else args[0], True  # rename: the destination
        else:
            return
        if writes and isinstance(path, (str, bytes, os.PathLike)):
            full = os.path.abspath(os.fsdecode(path))
            if full.startswith(_out):
                _log.write(f"{event} {full}\\n")

    sys.addaudithook(_hook)
'''


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_two_ranks_follow_one_process_and_rank_0_alone_writes(kind, corpus, tmp_path):
    # Adam is nearly blind to a gradient's scale; SGD on the LM is not, so a mis-scaled all-reduce shows.
    values = settings(kind, corpus, **({"optimizer": "sgd", "lr": 1.0, "momentum": 0.5} if kind == "lm" else {}))
    single = tmp_path / "one"
    train(TrainConfig(kind=kind, **values), single)

    # Every file operation of every process under OUT is recorded by an audit hook (sitecustomize).
    hooks, audit, out = tmp_path / "hooks", tmp_path / "audit", tmp_path / "two"
    hooks.mkdir(), audit.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT_HOOK)
    path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH", "")) if p)
    torchrun_train(kind, values, out, env={"PYTHONPATH": path, "AUDIT_DIR": str(audit), "AUDIT_WATCH": str(out)})

    one, two = losses(single), losses(out)
    assert len(one) == len(two) > 10
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-5, (one[:5], two[:5])
    assert [r["step"] for r in log_records(out) if "loss" in r] == list(range(1, len(two) + 1))
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert json.loads((single / "config.json").read_text())["world_size"] == 1
    summaries = [r for r in log_records(out) if "epoch_end" in r]
    assert [r["train_tokens_per_s"] > 0 for r in summaries] == [True, True]
    single_valid = [r["valid_loss"] for r in log_records(single) if "epoch_end" in r]
    assert abs(summaries[-1]["valid_loss"] - single_valid[-1]) < 1e-5

    writes = {f.name.split("-")[0]: f.read_text().splitlines() for f in audit.iterdir()}
    assert set(writes) >= {"0", "1"}, writes.keys()
    assert writes["1"] == [], f"rank 1 wrote into the run directory: {writes['1'][:5]}"
    assert writes.get("launcher", []) == []
    written = "\n".join(writes["0"])
    for name in ("config.json", "train_log.jsonl", "last.pt", "best.pt", "tensorboard"):
        assert f"{out}/{name}" in written, f"rank 0 never wrote {name}"
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_resume_under_two_ranks_continues_exactly(kind, corpus, tmp_path):
    # Dropout and scheduled sampling on: each rank's random stream must come back, and the LM's carried state.
    values = settings(kind, corpus, dropout=0.3, scheduled_sampling=0.2 if kind == "seq2seq" else 0.0)
    full = tmp_path / "full"
    torchrun_train(kind, values, full)
    per_epoch = len(losses(full)) // 2
    cut = tmp_path / "cut"
    torchrun_train(kind, {**values, "max_steps": per_epoch + 2}, cut)
    shutil.copytree(cut, tmp_path / "cut-again")
    assert len(losses(cut)) == per_epoch + 2
    torchrun_train(kind, {"max_steps": 0}, cut, "--resume")
    assert losses(cut) == losses(full)
    assert [r for r in log_records(cut) if "resumed_at_step" in r] == [
        {"resumed_at_step": per_epoch + 2, "world_size": 2, "checkpoint_world_size": 2}]

    # The checkpoint does not depend on the number of ranks: one process picks it up, and says what changed.
    again = tmp_path / "cut-again"
    train(None, again, resume=True, overrides={"max_steps": 0})
    note = [r for r in log_records(again) if "resumed_at_step" in r]
    assert note[0]["checkpoint_world_size"] == 2 and note[0]["world_size"] == 1
    assert "resumed a 2-rank run on 1 rank" in note[0]["note"]
    steps = [r["step"] for r in log_records(again) if "loss" in r]
    assert steps == list(range(1, 2 * per_epoch + 1))


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rank_pid(root: int, rank: int) -> int:
    for pid in descendants(root):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b" ".join(environ):
            return pid
    raise AssertionError(f"no worker process with RANK={rank} under pid {root}")


def start_endless_run(corpus, tmp_path, timeout_seconds: int) -> tuple[subprocess.Popen, Path, Path]:
    """A 2-rank LM run with no end; returns once rank 0 has logged a few steps."""
    out, stderr = tmp_path / "run", tmp_path / "stderr.txt"
    values = settings("lm", corpus, epochs=1_000_000, dist_timeout_seconds=timeout_seconds)
    process = torchrun_train("lm", values, out, stdout=subprocess.DEVNULL, stderr=stderr.open("w"))
    deadline = time.monotonic() + HANG_GUARD
    while not ((out / "train_log.jsonl").is_file() and len(losses(out)) >= 3):
        assert process.poll() is None, stderr.read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.2)
    return process, out, stderr


def test_a_killed_rank_ends_the_run_with_an_error(corpus, tmp_path):
    process, out, stderr = start_endless_run(corpus, tmp_path, timeout_seconds=60)
    survivor = rank_pid(process.pid, 0)
    os.kill(rank_pid(process.pid, 1), signal.SIGKILL)
    code = process.wait(timeout=HANG_GUARD)
    text = stderr.read_text()
    assert code != 0
    # torchrun names the rank that died and how; rank 0 stopped with it instead of waiting.
    root_cause = text.split("Root Cause", 1)[1]
    assert "rank      : 1" in root_cause and "SIGKILL" in root_cause, text[-3000:]
    assert not Path(f"/proc/{survivor}").exists(), "rank 0 outlived the run"


def test_a_hung_rank_ends_the_run_after_the_collective_timeout(corpus, tmp_path):
    process, out, stderr = start_endless_run(corpus, tmp_path, timeout_seconds=5)
    hung = rank_pid(process.pid, 1)
    os.kill(hung, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + HANG_GUARD
        while "seqserve train: rank 0 of 2" not in stderr.read_text():
            assert time.monotonic() < deadline, "rank 0 never gave up on the stopped rank"
            time.sleep(0.2)
    finally:
        os.kill(hung, signal.SIGKILL)  # torchrun would, 30 s after its SIGTERM to a stopped process
    code = process.wait(timeout=HANG_GUARD)
    text = stderr.read_text()
    assert code != 0
    message = next(line for line in text.splitlines() if line.startswith("seqserve train: rank 0 of 2"))
    assert "hung for more than dist_timeout_seconds=5" in message, message
    assert "Timed out" in message and "--resume" in message, message
