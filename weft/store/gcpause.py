"""Pausing Python's cyclic garbage collector while a replica folds a backlog.

A rebuild creates millions of long-lived dicts and no reference cycles, yet each batch of
allocations makes the cyclic GC rescan the growing heap (decode + fold ran 1.4x slower with it on,
make bench). Pauses nest, since several projects may attach at once; when the last one ends,
collection resumes and what was built is frozen (`gc.freeze`), so later full collections skip it.
Every pause ends: when the work is done, or after `limit_s` at the latest.
"""

from __future__ import annotations

import asyncio
import gc
import logging

log = logging.getLogger("weft.store.gcpause")

_active = 0
_resume_enabled = False


class Pause:
    """One holder's pause; `end()` is idempotent."""

    def __init__(self, limit_s: float | None = None) -> None:
        global _active, _resume_enabled
        if _active == 0:
            _resume_enabled = gc.isenabled()
            gc.disable()
        _active += 1
        self._ended = False
        self._timer: asyncio.TimerHandle | None = None
        if limit_s is not None:
            self._timer = asyncio.get_running_loop().call_later(limit_s, self._expire)

    def _expire(self) -> None:
        if not self._ended:
            log.warning("garbage collection resumed before a rebuild finished (pause limit reached)")
            self.end()

    def end(self) -> None:
        global _active
        if self._ended:
            return
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
        _active -= 1
        if _active == 0 and _resume_enabled:
            gc.freeze()
            gc.enable()

    def __enter__(self) -> Pause:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()
