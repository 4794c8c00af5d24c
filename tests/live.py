"""Helpers for tests that talk to running servers: polling a condition with a bound, reading a stream in the
background."""

from __future__ import annotations

import threading
import time

import grpc


def wait_for(condition, timeout: float = 30.0, what: str = "condition", pause: float = 0.02):
    """`condition()`'s first true value, polled every `pause` seconds; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(pause)


class Reader(threading.Thread):
    """Reads a stream to its end in the background; `finished` is set when its last message arrived, `error`
    holds the RpcError that ended it, if one did."""

    def __init__(self, call):
        super().__init__(daemon=True)
        self.call, self.responses, self.error = call, [], None
        self.finished = threading.Event()
        self.start()

    def run(self):
        try:
            for response in self.call:
                self.responses.append(response)
        except grpc.RpcError as error:
            self.error = error
        self.finished.set()
