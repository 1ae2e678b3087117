"""The spin-up allow-list file (WEFT_SPINUP_POLICY_FILE), read at start and re-read when it changes.

The rules themselves are pure (`weft.core.spinup_policy`). A file that no longer parses is not
loaded: the last good policy stays in force and the error is logged, as for the token file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from weft.core.spinup_policy import ALLOW_ALL, PolicyFileError, SpinUpPolicy, parse_policy

log = logging.getLogger("weft.spinup.policy")

RELOAD_CHECK_S = 1.0  # how often the file's mtime is looked at (on use, never by a timer)


def read_policy(path: Path) -> SpinUpPolicy:
    try:
        return parse_policy(path.read_bytes())
    except OSError as err:
        raise PolicyFileError(f"cannot read {path}: {err.strerror}") from None
    except PolicyFileError as err:
        raise PolicyFileError(f"{path}: {err}") from None


class PolicyFile:
    """`current()` is the policy in force. Without a path every target is allowed."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._policy = read_policy(path) if path is not None else ALLOW_ALL
        self._stamp = self._stat()
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int] | None:
        if self._path is None:
            return None
        try:
            st = self._path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def current(self) -> SpinUpPolicy:
        if self._path is None:
            return self._policy
        now = time.monotonic()
        if now - self._checked >= RELOAD_CHECK_S:
            self._checked = now
            stamp = self._stat()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._policy = read_policy(self._path)
                    log.info("spin-up policy reloaded from %s", self._path)
                except PolicyFileError as err:
                    log.error("spin-up policy not reloaded, the previous one stays in force: %s", err)
        return self._policy


ALLOW_ALL_FILE = PolicyFile()
