"""The spin-up allow-list file (WEFT_SPINUP_POLICY_FILE), read at start and re-read when it changes
(`weft.watched_file`). The rules themselves are pure (`weft.core.spinup_policy`)."""

from __future__ import annotations

from pathlib import Path

from weft.core.spinup_policy import ALLOW_ALL, PolicyFileError, SpinUpPolicy, parse_policy
from weft.watched_file import WatchedFile, read_parsed


def read_policy(path: Path) -> SpinUpPolicy:
    return read_parsed(path, parse_policy, PolicyFileError)


class PolicyFile:
    """`current()` is the policy in force. Without a path every target is allowed."""

    def __init__(self, path: Path | None = None) -> None:
        self._watched = WatchedFile(path, read_policy, PolicyFileError, "spin-up policy") if path else None

    def current(self) -> SpinUpPolicy:
        return self._watched.current() if self._watched is not None else ALLOW_ALL


ALLOW_ALL_FILE = PolicyFile()
