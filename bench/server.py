"""The bench's own nats-server: 127.0.0.1, a free port, a temp store dir, R1 streams."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from nats.aio.client import Client as NATS

from weft.store import connection
from weft.store.embedded import EmbeddedNats, NatsServerConfig, free_port


@contextlib.asynccontextmanager
async def nats_server(store_dir: Path, *, sync_always: bool = True, name: str = "weft-bench") -> AsyncIterator[EmbeddedNats]:
    server = EmbeddedNats(
        NatsServerConfig(store_dir=store_dir, port=free_port(), server_name=name, sync_always=sync_always)
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def connect(url: str) -> NATS:
    """weft's own client class (connection.Client), so the bench measures what weft runs."""
    return await connection.connect(
        url,
        name="weft-bench",
        max_reconnect_attempts=2,
        connect_timeout=5,
    )


def quiet_logs() -> None:
    # nats-py logs every reconnect/slow-consumer at error level; the bench reports those itself.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
