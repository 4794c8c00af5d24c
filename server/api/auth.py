"""Bearer tokens: which ones a server accepts, compared in constant time, rotated without a restart.

Tokens come from the `auth_token` setting and from `auth_token_file` (one per line; blank lines and lines
starting with "#" are skipped). The file is read again when it changes (checked at most once a second),
so an operator rotates a token by adding the new one, moving clients over, then removing the old one.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

RELOAD_CHECK_SECONDS = 1.0


class TokenFileError(ValueError):
    """The token file cannot be read, or holds no token."""


def read_token_file(path: str | os.PathLike[str]) -> tuple[str, ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TokenFileError(f"auth_token_file {path} cannot be read: {error}") from None
    tokens = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise TokenFileError(f"auth_token_file {path} holds no token (one per line)")
    return tokens


class BearerTokens:
    """The accepted tokens; `enabled` is False when there are none (auth off)."""

    def __init__(self, token: str = "", token_file: str = "", clock=time.monotonic):
        self._fixed = (token,) if token else ()
        self._file = token_file
        self._clock = clock
        self._from_file: tuple[str, ...] = read_token_file(token_file) if token_file else ()
        self._mtime = self._stat() if token_file else None
        self._checked_at = clock()

    @property
    def enabled(self) -> bool:
        return bool(self._fixed or self._file)

    def accepts(self, presented: str) -> bool:
        """Whether `presented` is one of the tokens. Every token is compared, each in constant time, so
        the answer's timing says nothing about how much of a token matched or which one did."""
        self._reload_if_changed()
        given = presented.encode()
        found = False
        for token in (*self._fixed, *self._from_file):
            found |= hmac.compare_digest(given, token.encode())
        return found

    def _stat(self) -> float | None:
        try:
            return os.stat(self._file).st_mtime_ns
        except OSError:
            return None

    def _reload_if_changed(self) -> None:
        if not self._file:
            return
        now = self._clock()
        if now - self._checked_at < RELOAD_CHECK_SECONDS:
            return
        self._checked_at = now
        mtime = self._stat()
        if mtime == self._mtime:
            return
        try:
            self._from_file = read_token_file(self._file)
            self._mtime = mtime
            logger.info("auth_token_file %s reloaded: %d tokens", self._file, len(self._from_file))
        except TokenFileError as error:  # keep the tokens we had: a half-written file must not lock all out
            logger.error("%s; keeping the %d tokens read before", error, len(self._from_file))
