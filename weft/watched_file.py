"""A configuration file's parsed value, re-read when the file changes (the token file, the spin-up
policy). Its mtime and size are looked at on use, at most once every `CHECK_S`, never by a timer. A
file that no longer parses is not loaded: the last good value stays in force and the error is
logged, so a typo cannot lock every client out or open what was closed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger("weft.watched_file")

T = TypeVar("T")
CHECK_S = 1.0


def read_parsed(path: Path, parse: Callable[[bytes], T], error: type[Exception]) -> T:
    """`parse` of the file's bytes; an unreadable file or a parse error is `error`, naming the path."""
    try:
        return parse(path.read_bytes())
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror}") from None
    except error as err:
        raise error(f"{path}: {err}") from None


class WatchedFile(Generic[T]):
    def __init__(self, path: Path, read: Callable[[Path], T], error: type[Exception], what: str) -> None:
        """`read` parses the file, raising `error` (which, at start, propagates)."""
        self.path = path
        self._read = read
        self._error = error
        self._what = what
        self._value = read(path)
        self._stamp = self._stat()
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def force_check(self) -> None:
        """Look at the file on the next use whatever the interval (tests, SIGHUP)."""
        self._checked = 0.0

    def current(self) -> T:
        now = time.monotonic()
        if now - self._checked < CHECK_S:
            return self._value
        self._checked = now
        stamp = self._stat()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._value = self._read(self.path)
                log.info("%s reloaded from %s", self._what, self.path)
            except self._error as err:
                log.error("%s not reloaded; the previous one stays in force", self._what, extra={"error": str(err)})
        return self._value
