"""How every weft program connects to NATS: the server list, the reconnect-forever options and the
client class (nats-py's, with a cheaper header parser)."""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as _NatsClient

# Reconnect forever, quickly: weft replicas and agents outlive NATS restarts and partitions.
RECONNECT_FOREVER: dict[str, Any] = {
    "max_reconnect_attempts": -1,
    "reconnect_time_wait": 0.5,
    "allow_reconnect": True,
    "connect_timeout": 2,
}


def servers(url: str) -> list[str]:
    """NATS_URL may list several servers, comma-separated, as the NATS CLI and other clients accept."""
    return [u.strip() for u in url.split(",") if u.strip()]


_MISSING: Any = object()
# Header names repeat on every message (Nats-Msg-Id, Nats-Expected-Last-Subject-Sequence, ...):
# remember how each raw name parses. Bounded, so hostile names cannot grow it without limit.
_NAMES: dict[bytes, str | None] = {}
_NAMES_MAX = 1024


def _header_name(raw: bytes) -> str | None:
    try:
        key = raw.strip().decode("ascii")
    except UnicodeDecodeError:
        return None
    return None if any(c.isspace() for c in key) else key


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """nats-py 2.16's `Client._parse_header_lines`, result for result (a test compares them), at a
    fifth of the cost: it checks every character of every name with `str.isspace`, which was ~40%
    of a projection rebuild, since every stored event carries its Msg-Id and OCC headers."""
    out: dict[str, str] = {}
    names = _NAMES
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = names.get(name, _MISSING)
        if key is _MISSING:
            key = _header_name(name)
            if len(names) < _NAMES_MAX:
                names[name] = key
        if key is not None:
            out[key] = value.strip().decode("utf-8", "replace")
    return out


class Client(_NatsClient):
    """nats-py's client; only the header parser differs (see `parse_header_lines`)."""

    _parse_header_lines = staticmethod(parse_header_lines)


async def connect(url: str | list[str], **options: Any) -> Client:
    """`nats.connect`, returning weft's client class. `url` may be a comma-separated list."""
    nc = Client()
    await nc.connect(servers(url) if isinstance(url, str) else url, **options)
    return nc
