"""Ids and event timestamps, minted at the edges. Randomness and the clock are read only outside
`projections/` and `weft/core/` (which must replay the same way every time); event ids and event
times come from here."""

from __future__ import annotations

import os
import threading
import time

from projections.events import Event


class _RandomPool:
    """Random bytes from os.urandom, fetched 4 KiB at a time: ids are minted on every command, and a
    getrandom syscall per id was a visible share of a submit under load (a syscall is where a busy
    process loses its CPU to nats-server and the clients on a small machine)."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._lock = threading.Lock()  # ids may be minted off the loop (spin-up threads)
        self._buf = b""
        self._pos = 0

    def take16(self) -> bytes:
        with self._lock:
            if self._pos + 16 > len(self._buf):
                self._buf, self._pos = os.urandom(self._size), 0
            pos = self._pos
            self._pos = pos + 16
            return self._buf[pos : pos + 16]


_random = _RandomPool()


def new_id() -> str:
    """A random 128-bit id in hex (event ids, correlation ids)."""
    return _random.take16().hex()


def new_uuid() -> str:
    """A random (version 4) UUID in its canonical form, for ids clients see (work items, spin-ups)."""
    b = bytearray(_random.take16())
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_second: tuple[int, str] = (-1, "")  # (epoch second, "YYYY-MM-DDTHH:MM:SS."), swapped whole


def utc_now() -> str:
    """Now as `YYYY-MM-DDTHH:MM:SS.mmmZ`; the date part is formatted once a second (every event
    carries a timestamp, and strftime per event was a visible share of a submit)."""
    global _second
    t = time.time()
    sec = int(t)
    cached_sec, prefix = _second
    if sec != cached_sec:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
        _second = (sec, prefix)
    return f"{prefix}{int((t - sec) * 1000):03d}Z"


def stamp(ev: Event) -> Event:
    """Give an event the id and time it lacks, as it enters the store (its maker may set both)."""
    if not ev.id:
        ev.id = new_id()
    if not ev.ts:
        ev.ts = utc_now()
    return ev
