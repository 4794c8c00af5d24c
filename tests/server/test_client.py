"""server/client.py: flags -> DecodingOptions, model resolution, and exit codes against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import server as server_package
from exporters.bundle import ExportOptions, export_run
from exporters.parity import ParitySettings
from seqserve.v1 import service_pb2 as pb
from server.app import ServerThread
from server.client import build_parser, decoding_options, main
from server.config import ServerConfig

S = pb.DecodingOptions


def options_of(*argv):
    return decoding_options(build_parser().parse_args(["generate", *argv, "hello"]))


def test_unset_flags_stay_unset():
    options = options_of()
    assert options == S(strategy=S.STRATEGY_GREEDY)
    assert not options.HasField("temperature") and not options.HasField("seed")


def test_every_flag_reaches_the_options():
    options = options_of("--beam-size", "5", "--n-best", "2", "--length-penalty", "0.6", "--early-stopping",
                         "--max-new-tokens", "9", "--min-new-tokens", "2", "--stop", "x", "--stop", "yz",
                         "--repetition-penalty", "1.2", "--no-repeat-ngram-size", "3", "--log-probs")
    assert options == S(strategy=S.STRATEGY_BEAM, beam_size=5, n_best=2, length_penalty=0.6, early_stopping=True,
                        max_new_tokens=9, min_new_tokens=2, stop=["x", "yz"], repetition_penalty=1.2,
                        no_repeat_ngram_size=3, return_log_probs=True)
    sampled = options_of("--temperature", "0.7", "--top-k", "4", "--top-p", "0.9", "--seed", "11",
                         "--top-log-probs", "2")
    assert sampled == S(strategy=S.STRATEGY_SAMPLE, temperature=0.7, top_k=4, top_p=0.9, seed=11, top_log_probs=2)
    assert options_of("--strategy", "greedy", "--temperature", "0.5").strategy == S.STRATEGY_GREEDY


def test_common_flags_before_or_after_the_command():
    parser = build_parser()
    before = parser.parse_args(["--target", "h:1", "--json", "models"])
    after = parser.parse_args(["models", "--target", "h:1", "--json"])
    assert (before.target, before.json) == (after.target, after.json) == ("h:1", True)


def test_usage_errors_exit_2(capsys):
    assert main(["translate"]) == 2  # TEXT is required
    assert main(["frobnicate"]) == 2
    assert main(["--help"]) == 0
    capsys.readouterr()


def test_negative_seed_is_refused_before_the_call(capsys):
    assert main(["--target", "127.0.0.1:1", "generate", "--model", "m", "--seed", "-1", "x"]) == 1
    assert capsys.readouterr().err.startswith("INVALID_ARGUMENT: --seed")


def test_unreachable_server_prints_unavailable(capsys):
    assert main(["--target", "127.0.0.1:1", "--timeout", "2", "models"]) == 1
    assert capsys.readouterr().err.startswith("UNAVAILABLE: ")


@pytest.mark.parametrize("argv", [["translate", "--model", "m", "ab\udcffc"], ["generate", "--model", "m", "\udcff"]])
def test_undecodable_argument_is_invalid_argument(capsys, argv):
    assert main(["--target", "127.0.0.1:1", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("INVALID_ARGUMENT: ") and "must be valid UTF-8, got the bytes b'" in err


# --- against a real server ----------------------------------------------------------------------------------

SMALL_EXPORT = ExportOptions(eval_limit=20, real_inputs=100,
                             parity=ParitySettings(greedy_inputs=20, beam_inputs=6, max_new_tokens=20))


@pytest.fixture(scope="module")
def target(tiny_runs, tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        export_run(tiny_runs["gru", "seq2seq"], repository, "tiny-g2p", options=SMALL_EXPORT)
        for name in ("tiny-lm", "other-lm"):  # two language models: generate needs --model
            export_run(tiny_runs["lstm", "lm"], repository, name, options=SMALL_EXPORT)
    finally:
        torch.set_num_threads(before)
    config = ServerConfig(repository=str(repository), port=0, metrics_port=-1, poll_interval_seconds=0,
                          log_level="error")
    with ServerThread(config) as server:
        yield f"127.0.0.1:{server.port}"


def run(capsys, target, *argv):
    code = main(["--target", target, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_and_describes(capsys, target):
    code, out, _ = run(capsys, target, "models")
    assert code == 0 and [line.split("\t")[0] for line in out.splitlines()] == ["other-lm", "tiny-g2p", "tiny-lm"]
    code, out, _ = run(capsys, target, "models", "--model", "tiny-g2p", "--json")
    info = json.loads(out)
    assert code == 0 and info["name"] == "tiny-g2p" and info["providers"] == ["CPUExecutionProvider"]
    assert info["manifest"]["kind"] == "MODEL_KIND_SEQ2SEQ"


def test_translate_finds_the_only_translator(capsys, target):
    code, out, _ = run(capsys, target, "translate", "abc", "fade")
    assert code == 0 and len(out.splitlines()) == 2
    code, out, _ = run(capsys, target, "translate", "--beam-size", "3", "--n-best", "2", "abc")
    assert code == 0 and len([line for line in out.splitlines() if "\t" in line]) == 2
    code, out, _ = run(capsys, target, "translate", "--stream", "--json", "abc")
    messages = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and "done" in messages[-1] and all("chunk" in m for m in messages[:-1])


def test_generate_streams_text(capsys, target):
    code, out, _ = run(capsys, target, "generate", "--model", "tiny-lm", "--max-new-tokens", "12",
                       "--min-new-tokens", "12", "the", "cat")
    assert code == 0 and len(out) == 13 and out.endswith("\n")
    code, out, _ = run(capsys, target, "generate", "--model", "tiny-lm", "--json", "--seed", "3", "--priority", "2",
                       "the")
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[-1]["done"]["model"] == "tiny-lm"
    assert "".join(m["chunk"].get("text", "") for m in lines[:-1]) == lines[-1]["done"].get("text", "")


def test_failed_calls_exit_1_with_the_status_name(capsys, target):
    code, _, err = run(capsys, target, "translate", "--strategy", "sample", "--top-p", "1.5", "abc")
    assert code == 1
    assert err.splitlines()[0] == "INVALID_ARGUMENT: options.top_p must be in (0, 1], got 1.5"
    assert "field options.top_p: " in err
    code, _, err = run(capsys, target, "generate", "--model", "tiny-lm", "--priority", "11", "x")
    assert code == 1 and err.startswith("INVALID_ARGUMENT: priority must be an integer in [-10, 10]")
    code, _, err = run(capsys, target, "generate", "--model", "nope", "x")
    assert code == 1 and err.startswith("NOT_FOUND: unknown model 'nope'")
    code, _, err = run(capsys, target, "generate", "x")
    assert code == 1 and err.startswith("FAILED_PRECONDITION: --model is needed") and "other-lm, tiny-lm" in err
    code, out, err = run(capsys, target, "--json", "translate", "--model", "tiny-lm", "x")
    assert code == 1 and json.loads(out)["error"]["code"] == "FAILED_PRECONDITION"


def test_the_console_script_exits_non_zero_on_failure(target):
    env = {**os.environ, "PYTHONPATH": str(Path(server_package.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-m", "seqserve.cli", "client", "--target", target, "translate",
                             "--model", "nope", "abc"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("NOT_FOUND: ")


def test_session_commands_keep_and_fork_state(capsys, target):
    code, session, _ = run(capsys, target, "session", "create", "--model", "tiny-lm", "the")
    session = session.strip()
    assert code == 0 and len(session) == 32
    code, out, _ = run(capsys, target, "session", "feed", "--log-probs", session, " cat")
    assert code == 0 and len(out.splitlines()) == 4  # one line per fed character
    code, fork, _ = run(capsys, target, "session", "fork", session)
    fork = fork.strip()
    # Greedy continuations of the session and of its fork are the same text.
    outs = [run(capsys, target, "session", "generate", "--max-new-tokens", "6", "--leave-unchanged", sid)
            for sid in (session, fork)]
    assert outs[0][0] == outs[1][0] == 0 and outs[0][1] == outs[1][1]
    code, out, _ = run(capsys, target, "session", "get", "--json", fork)
    assert code == 0 and int(json.loads(out)["tokens_consumed"]) > 0
    assert run(capsys, target, "session", "close", session)[0] == 0
    code, _, err = run(capsys, target, "session", "get", session)
    assert code == 1 and err.startswith("NOT_FOUND") and "closed" in err
