"""server/app.py's logs: one JSON object per line with the call's request id and the `extra` fields."""

from __future__ import annotations

import io
import json
import logging

import pytest

from server.api.errors import request_id_var
from server.app import setup_logging


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_request_id_and_extras(restore_root_logger):
    out = io.StringIO()
    setup_logging("json", "info", stream=out)
    token = request_id_var.set("req-7")
    try:
        logging.getLogger("server.test").info("Translate OK in %.1f ms", 2.5, extra={"rpc": "Translate", "code": "OK"})
    finally:
        request_id_var.reset(token)
    logging.getLogger("server.test").debug("not shown at info")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("server.test").exception("failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "Translate OK in 2.5 ms" and first["level"] == "info"
    assert (first["request_id"], first["rpc"], first["code"], first["logger"]) == ("req-7", "Translate", "OK",
                                                                                   "server.test")
    assert "request_id" not in second and "ValueError: boom" in second["exception"]


def test_text_format(restore_root_logger):
    out = io.StringIO()
    setup_logging("text", "warning", stream=out)
    logging.getLogger("x").warning("hello")
    assert out.getvalue().rstrip().endswith("WARNING x [-] hello")
